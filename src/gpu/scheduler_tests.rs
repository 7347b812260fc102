use super::*;

fn devs(totals: &[u64]) -> Vec<DeviceSlot> {
    totals
        .iter()
        .enumerate()
        .map(|(i, t)| DeviceSlot {
            index: i as u32,
            total_mb: *t,
            profile: None,
        })
        .collect()
}

fn req(agent: &str, count: u32, vram_mb: u64, priority: u32, at: u64) -> Request {
    Request {
        agent: agent.into(),
        count,
        vram_mb,
        priority,
        exclusive: false,
        enqueued_ms: at,
        seq: 0,
        profile: None,
    }
}

fn no_preempt() -> Config {
    Config {
        preemption: false,
        ..Config::default()
    }
}

/// The grants of a pass as "agent@dev,dev".
fn granted(ds: &[SchedulerAction]) -> Vec<String> {
    ds.iter()
        .filter_map(|d| match d {
            SchedulerAction::Grant { agent, devices } => Some(format!(
                "{agent}@{}",
                devices
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn admission_refuses_what_no_device_can_hold() {
    let s = Scheduler::new(&devs(&[16_000, 24_000]), Config::default());
    assert_eq!(s.admit(0, 1, None), Err(Rejected::Empty));
    assert!(matches!(s.admit(3, 1, None), Err(Rejected::TooMany { .. })));
    assert!(matches!(
        s.admit(1, 30_000, None),
        Err(Rejected::TooLarge { .. })
    ));
    // Two GPUs of 20 GB: only one device holds that much.
    assert!(matches!(
        s.admit(2, 20_000, None),
        Err(Rejected::TooLarge { .. })
    ));
    assert_eq!(s.admit(2, 16_000, None), Ok(()));
    assert_eq!(s.admit(1, 24_000, None), Ok(()));
}

#[test]
fn vram_is_reserved_and_the_second_request_waits_for_the_first() {
    let mut s = Scheduler::new(&devs(&[16_000]), no_preempt());
    s.submit(req("a", 1, 10_000, 0, 1)).unwrap();
    s.submit(req("b", 1, 10_000, 0, 2)).unwrap();
    assert_eq!(granted(&s.schedule(3)), ["a@0"]);
    assert!(s.is_queued("b"));
    assert!(s.schedule(4).is_empty());
    s.release("a").unwrap();
    assert_eq!(granted(&s.schedule(5)), ["b@0"]);
    assert_eq!(s.devices().next().unwrap().2, 10_000);
}

#[test]
fn higher_priority_runs_first_and_ties_are_fifo() {
    let mut s = Scheduler::new(&devs(&[10_000]), no_preempt());
    s.submit(req("holder", 1, 10_000, 9, 0)).unwrap();
    s.schedule(0);
    s.submit(req("low-early", 1, 10_000, 1, 1)).unwrap();
    s.submit(req("high", 1, 10_000, 5, 2)).unwrap();
    s.submit(req("high-later", 1, 10_000, 5, 3)).unwrap();
    let order: Vec<String> = s.ordered(4).iter().map(|r| r.agent.clone()).collect();
    assert_eq!(order, ["high", "high-later", "low-early"]);
    for expect in ["high", "high-later", "low-early"] {
        let held: Vec<String> = s.leases().map(|l| l.request.agent.clone()).collect();
        s.release(&held[0]);
        assert_eq!(granted(&s.schedule(5)), [format!("{expect}@0")]);
    }
}

#[test]
fn aging_lifts_a_waiting_request_by_at_most_the_cap() {
    let cfg = Config {
        aging_step_ms: 1000,
        aging_cap: 2,
        preemption: false,
        ..Config::default()
    };
    let mut s = Scheduler::new(&devs(&[10_000]), cfg);
    s.submit(req("holder", 1, 10_000, 0, 0)).unwrap();
    s.schedule(0);
    s.submit(req("old-low", 1, 10_000, 1, 0)).unwrap();
    s.submit(req("new-mid", 1, 10_000, 2, 2500)).unwrap();
    s.submit(req("new-top", 1, 10_000, 4, 2500)).unwrap();
    // At 2.5 s old-low has aged by 2 classes (cap 2) to 3: ahead of mid (2), behind top (4).
    let order: Vec<String> = s.ordered(2500).iter().map(|r| r.agent.clone()).collect();
    assert_eq!(order, ["new-top", "old-low", "new-mid"]);
    // Ten seconds later the cap holds old-low at 3 while new-mid has aged to 4 (and new-top
    // to 6): the cap stops an old request from overtaking every newer class.
    let order: Vec<String> = s.ordered(12_500).iter().map(|r| r.agent.clone()).collect();
    assert_eq!(order, ["new-top", "new-mid", "old-low"]);
    let view = s.queue_view(2500);
    assert_eq!(view[1].effective_priority, 3);
    assert_eq!(view[1].waited_ms, 2500);
}

#[test]
fn caps_per_gpu_and_global() {
    let cfg = Config {
        max_per_gpu: 1,
        max_leases: 2,
        preemption: false,
        ..Config::default()
    };
    let mut s = Scheduler::new(&devs(&[40_000, 40_000, 40_000]), cfg);
    for (i, a) in ["a", "b", "c"].iter().enumerate() {
        s.submit(req(a, 1, 1000, 0, i as u64)).unwrap();
    }
    let g = granted(&s.schedule(10));
    // One lease per GPU, two in all: c waits although a third GPU is empty.
    assert_eq!(g, ["a@0", "b@1"]);
    assert!(s.is_queued("c"));
    s.release("a");
    assert_eq!(granted(&s.schedule(11)), ["c@0"]);
}

#[test]
fn binpack_fills_one_device_before_the_next_and_spread_does_not() {
    let mut s = Scheduler::new(&devs(&[16_000, 16_000]), no_preempt());
    s.submit(req("a", 1, 4000, 0, 1)).unwrap();
    s.submit(req("b", 1, 4000, 0, 2)).unwrap();
    assert_eq!(granted(&s.schedule(3)), ["a@0", "b@0"]);
    let mut s = Scheduler::new(
        &devs(&[16_000, 16_000]),
        Config {
            placement: Placement::Spread,
            ..no_preempt()
        },
    );
    s.submit(req("a", 1, 4000, 0, 1)).unwrap();
    s.submit(req("b", 1, 4000, 0, 2)).unwrap();
    assert_eq!(granted(&s.schedule(3)), ["a@0", "b@1"]);
}

#[test]
fn gang_requests_get_all_their_devices_at_once_or_wait() {
    let mut s = Scheduler::new(&devs(&[16_000, 16_000, 16_000]), no_preempt());
    s.submit(req("single", 1, 12_000, 0, 1)).unwrap();
    s.schedule(1);
    s.submit(req("gang", 3, 8000, 0, 2)).unwrap();
    // Two devices have room, the third does not: nothing is granted in part.
    assert!(granted(&s.schedule(2)).is_empty());
    assert!(s.leases().all(|l| l.request.agent == "single"));
    s.release("single");
    assert_eq!(granted(&s.schedule(3)), ["gang@0,1,2"]);
}

#[test]
fn exclusive_takes_a_whole_device() {
    let mut s = Scheduler::new(&devs(&[16_000, 16_000]), no_preempt());
    let mut ex = req("ex", 1, 1000, 0, 1);
    ex.exclusive = true;
    s.submit(req("shared", 1, 1000, 0, 0)).unwrap();
    s.submit(ex).unwrap();
    s.submit(req("shared2", 1, 1000, 0, 2)).unwrap();
    let g = granted(&s.schedule(3));
    // shared binpacks on 0, ex needs an empty device (1), shared2 cannot join ex on 1.
    assert_eq!(g, ["shared@0", "ex@1", "shared2@0"]);
}

#[test]
fn backfill_uses_other_devices_but_never_the_blocked_heads() {
    let mut s = Scheduler::new(&devs(&[16_000, 16_000]), no_preempt());
    s.submit(req("a", 1, 10_000, 0, 0)).unwrap();
    s.submit(req("b", 1, 10_000, 0, 1)).unwrap();
    s.schedule(1); // a on 0, b on 1 (binpack cannot share 10+10 on 16).
    s.submit(req("head", 1, 14_000, 5, 2)).unwrap();
    s.submit(req("small", 1, 4000, 0, 3)).unwrap();
    s.submit(req("small2", 1, 4000, 0, 4)).unwrap();
    let g = granted(&s.schedule(5));
    // head waits for a device; it holds device 0 (tie: lowest index), so small and small2 go
    // to device 1 only — where one fits (6 GB free), the other not.
    assert_eq!(g, ["small@1"]);
    let view = s.queue_view(5);
    assert_eq!(view[0].request.agent, "head");
    assert_eq!(view[0].reserved_devices, vec![0]);
    // When device 0's lease ends the head starts at once: the backfill did not delay it.
    s.release("a");
    assert_eq!(granted(&s.schedule(6)), ["head@0"]);
}

#[test]
fn nothing_is_backfilled_when_the_global_cap_blocks_the_head() {
    let cfg = Config {
        max_leases: 1,
        preemption: false,
        ..Config::default()
    };
    let mut s = Scheduler::new(&devs(&[16_000, 16_000]), cfg);
    s.submit(req("a", 1, 1000, 0, 0)).unwrap();
    s.schedule(0);
    s.submit(req("head", 1, 1000, 0, 1)).unwrap();
    s.submit(req("later", 1, 1000, 0, 2)).unwrap();
    assert!(s.schedule(3).is_empty());
    s.release("a");
    assert_eq!(granted(&s.schedule(4)), ["head@0"]);
}

#[test]
fn preemption_only_by_a_strictly_higher_class_with_fewest_victims() {
    let mut s = Scheduler::new(&devs(&[16_000, 16_000]), Config::default());
    s.submit(req("low-a", 1, 8000, 1, 0)).unwrap();
    s.submit(req("low-b", 1, 8000, 1, 1)).unwrap();
    s.submit(req("low-c", 1, 12_000, 1, 2)).unwrap();
    let g = granted(&s.schedule(3));
    assert_eq!(g.len(), 3); // a+b on 0, c on 1
                            // Same class: no preemption, it waits.
    s.submit(req("same", 1, 16_000, 1, 4)).unwrap();
    let ds = s.schedule(5);
    assert!(ds.is_empty(), "{ds:?}");
    s.cancel("same");
    // Higher class: device 1 needs one victim (c), device 0 two: c is chosen.
    s.submit(req("high", 1, 16_000, 3, 6)).unwrap();
    let ds = s.schedule(7);
    assert_eq!(
        ds,
        vec![SchedulerAction::Preempt {
            for_agent: "high".into(),
            victims: vec!["low-c".into()]
        }]
    );
    // While c is being stopped nobody else is picked, and nothing is backfilled onto its
    // device.
    assert!(s.schedule(8).is_empty());
    let lease = s.release("low-c").unwrap();
    assert_eq!(granted(&s.schedule(9)), ["high@1"]);
    // The victim is requeued at its original time and keeps its place among its class.
    let mut again = lease.request.clone();
    again.seq = lease.request.seq;
    s.submit(again).unwrap();
    assert_eq!(s.queue_view(10)[0].request.enqueued_ms, 2);
}

#[test]
fn preemption_off_means_waiting() {
    let mut s = Scheduler::new(&devs(&[16_000]), no_preempt());
    s.submit(req("low", 1, 16_000, 0, 0)).unwrap();
    s.schedule(0);
    s.submit(req("high", 1, 16_000, 9, 1)).unwrap();
    assert!(s.schedule(2).is_empty());
}

#[test]
fn overuse_is_reported_per_agent() {
    let mut s = Scheduler::new(&devs(&[16_000, 16_000]), no_preempt());
    s.submit(req("a", 1, 4000, 0, 0)).unwrap();
    s.submit(req("b", 1, 4000, 0, 1)).unwrap();
    s.schedule(2);
    let usage = vec![
        ("a".to_string(), 0, 3900),
        ("b".to_string(), 0, 4001),
        ("stranger".to_string(), 1, 9000),
    ];
    assert_eq!(s.overusers(&usage), vec![("b".to_string(), 0, 4001, 4000)]);
}

#[test]
fn duplicate_requests_and_restored_leases() {
    let mut s = Scheduler::new(&devs(&[16_000]), no_preempt());
    s.submit(req("a", 1, 6000, 0, 0)).unwrap();
    assert_eq!(s.submit(req("a", 1, 1, 0, 0)), Err(Rejected::Duplicate));
    s.schedule(1);
    let lease = s.lease("a").unwrap().clone();
    let mut t = Scheduler::new(&devs(&[16_000]), no_preempt());
    t.restore_lease(lease);
    t.submit(req("b", 1, 12_000, 0, 2)).unwrap();
    assert!(
        t.schedule(3).is_empty(),
        "the restored lease holds its VRAM"
    );
    t.release("a");
    assert_eq!(granted(&t.schedule(4)), ["b@0"]);
}

#[test]
fn the_blocked_heads_hold_does_not_move_to_where_backfill_ran() {
    let mut s = Scheduler::new(&devs(&[16_000, 16_000]), no_preempt());
    s.submit(req("a", 1, 12_000, 0, 0)).unwrap();
    s.submit(req("b", 1, 8000, 0, 1)).unwrap();
    s.submit(req("c", 1, 8000, 0, 2)).unwrap();
    assert_eq!(granted(&s.schedule(2)), ["a@0", "b@1", "c@1"]);
    s.submit(req("head", 1, 16_000, 5, 3)).unwrap();
    s.submit(req("filler", 1, 6000, 0, 4)).unwrap();
    assert!(s.schedule(4).is_empty());
    assert_eq!(s.queue_view(4)[0].reserved_devices, vec![0]);
    // Device 1 now has more room than device 0, but the hold stays on 0 and the filler
    // backfills on 1; when a leaves, the head starts at once on 0.
    s.release("c");
    assert_eq!(granted(&s.schedule(5)), ["filler@1"]);
    assert_eq!(s.queue_view(5)[0].reserved_devices, vec![0]);
    s.release("a");
    assert_eq!(granted(&s.schedule(6)), ["head@0"]);
}

#[test]
fn a_lost_device_takes_no_new_lease_and_keeps_the_ones_it_has() {
    let mut s = Scheduler::new(&devs(&[16_000, 16_000]), no_preempt());
    s.submit(req("a", 1, 8000, 0, 0)).unwrap();
    assert_eq!(granted(&s.schedule(1)), ["a@0"]);
    s.set_offline(1, true);
    assert!(s.is_offline(1));
    s.submit(req("b", 1, 12_000, 0, 2)).unwrap();
    assert!(
        s.schedule(2).is_empty(),
        "device 1 is lost, device 0 too full"
    );
    assert!(s.lease("a").is_some(), "the lease on a live device stays");
    s.set_offline(1, false);
    assert_eq!(granted(&s.schedule(3)), ["b@1"]);
}

#[test]
fn mig_instances_go_only_to_requests_for_their_profile_one_lease_each() {
    let mut slots = devs(&[80_000]);
    for (i, p) in [(1, "1g.10gb"), (2, "1g.10gb"), (3, "3g.40gb")] {
        slots.push(DeviceSlot {
            index: i,
            total_mb: if p == "1g.10gb" { 9984 } else { 40_192 },
            profile: Some(p.into()),
        });
    }
    let mut s = Scheduler::new(&slots, no_preempt());
    let mig = |agent: &str, profile: &str, at| Request {
        profile: Some(profile.into()),
        ..req(agent, 1, 4000, 0, at)
    };
    assert!(matches!(
        s.admit(3, 4000, Some("1g.10gb")),
        Err(Rejected::NoProfile { have: 2, .. })
    ));
    assert!(matches!(
        s.admit(1, 4000, Some("7g.80gb")),
        Err(Rejected::NoProfile { have: 0, .. })
    ));
    assert!(matches!(
        s.admit(2, 4000, None),
        Err(Rejected::TooMany { have: 1, .. })
    ));
    s.submit(mig("a", "1g.10gb", 0)).unwrap();
    s.submit(mig("b", "1g.10gb", 1)).unwrap();
    s.submit(mig("c", "1g.10gb", 2)).unwrap();
    s.submit(req("whole", 1, 4000, 0, 3)).unwrap();
    s.submit(mig("big", "3g.40gb", 4)).unwrap();
    // One lease per instance even though 4000 MiB would fit twice; whole GPUs to the request
    // without a profile; the third 1g waits for an instance.
    assert_eq!(granted(&s.schedule(5)), ["a@1", "b@2", "whole@0", "big@3"]);
    assert!(s.is_queued("c"));
    s.release("a");
    assert_eq!(granted(&s.schedule(6)), ["c@1"]);
}
