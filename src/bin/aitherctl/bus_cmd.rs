//! `aitherctl bus`: publish, subscribe and inspect AitherFlux, the event bus (docs/bus.md),
//! as an operator (the control socket: root and group aither; no subject is off limits).

use std::io::{Read, Write};
use std::time::Duration;

use aither::daemon;
use aither::daemon::client::{Client, ClientError};
use aither::daemon::proto::{Reply, Request};
use aither::units::{now_ms, to_ms};
use clap::{Args, Subcommand};

const EXIT_REFUSED: i32 = 1;
const EXIT_USAGE: i32 = 2;
const EXIT_UNREACHABLE: i32 = 3;

/// The event bus: subjects with `*` and `>` wildcards, live pub/sub, a durable log.
#[derive(Subcommand)]
pub enum BusCmd {
    Pub(PubArgs),
    Sub(SubArgs),
    Streams(StreamsArgs),
    Ack(AckArgs),
    ConsumerRm(ConsumerRmArgs),
}

/// Move your durable consumer's cursor to SEQ (it resumes after SEQ). Consumer names are per
/// user: yours are yours alone; root and aither-admin act on another user's with --owner.
#[derive(Args)]
pub struct AckArgs {
    /// The durable consumer's name.
    name: String,
    /// The last sequence number processed.
    seq: u64,
    /// Root and aither-admin: the uid whose consumer it is.
    #[arg(long, value_name = "UID")]
    owner: Option<u32>,
}

/// Delete your durable consumer (its cursor). Exit 0 deleted, 1 no such consumer.
#[derive(Args)]
pub struct ConsumerRmArgs {
    /// The durable consumer's name.
    name: String,
    /// Root and aither-admin: the uid whose consumer it is.
    #[arg(long, value_name = "UID")]
    owner: Option<u32>,
}

/// Publish one message (or one per input line with --lines).
///
/// DATA is sent as JSON when it parses as JSON (`{"a":1}`, `42`, `"text"`), else as a string;
/// `--text` always sends a string; `-` reads it from stdin.
#[derive(Args)]
pub struct PubArgs {
    /// The subject, e.g. agent.w1.jobs (no wildcards).
    subject: String,
    /// The payload, or `-` for stdin.
    data: String,
    /// Append to the durable log (the reply comes after the commit and names its sequence).
    #[arg(long)]
    durable: bool,
    /// Send DATA as a string even if it is valid JSON.
    #[arg(long)]
    text: bool,
    /// With `-`: one message per line of stdin (pipelined).
    #[arg(long)]
    lines: bool,
}

/// Print messages on subjects matching PATTERN until interrupted.
///
/// Live by default (only new messages). --from SEQ or --since TIME replays the durable log
/// first and then goes on with new durable messages; --durable NAME resumes a named consumer
/// after its last ack (--ack acks each message once printed).
#[derive(Args)]
pub struct SubArgs {
    /// A subject pattern: `*` matches one token, `>` (last) one or more.
    pattern: String,
    /// Replay from this sequence number.
    #[arg(long, value_name = "SEQ", conflicts_with = "since")]
    from: Option<u64>,
    /// Replay from this long ago (e.g. 10m, 2h).
    #[arg(long, value_name = "TIME", value_parser = crate::parse_duration)]
    since: Option<Duration>,
    /// A durable consumer's name (its cursor is kept by aitherd).
    #[arg(long, value_name = "NAME")]
    durable: Option<String>,
    /// With --durable: ack every message after printing it.
    #[arg(long, requires = "durable")]
    ack: bool,
    /// Queue capacity in messages (16..=65536; default 1024). A live subscriber that falls
    /// further behind loses the oldest messages (the output says how many).
    #[arg(long, value_name = "N")]
    queue: Option<usize>,
    /// Exit after this many messages.
    #[arg(long, short = 'n', value_name = "N")]
    count: Option<u64>,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

/// The durable log (first/last sequence, messages, bytes, retention), its consumers and
/// their acked sequence, and the live subscriptions with their queues.
#[derive(Args)]
pub struct StreamsArgs {
    #[arg(long)]
    json: bool,
}

pub fn run(c: BusCmd) -> i32 {
    match c {
        BusCmd::Pub(a) => publish(a),
        BusCmd::Sub(a) => subscribe(a),
        BusCmd::Streams(a) => streams(a),
        BusCmd::Ack(a) => ack(&a.name, a.seq, a.owner).unwrap_or(0),
        BusCmd::ConsumerRm(a) => call_ok(&Request::BusConsumerRm {
            durable: a.name,
            owner: a.owner,
        }),
    }
}

fn connect() -> Result<Client, i32> {
    Client::connect(&daemon::socket_path()).map_err(|e| {
        eprintln!("aither: {e}");
        EXIT_UNREACHABLE
    })
}

fn client_err(e: ClientError) -> i32 {
    eprintln!("aither: {e}");
    EXIT_UNREACHABLE
}

fn refused(r: &Reply) -> i32 {
    match &r.error {
        Some(e) => eprintln!("aither: error: {} ({})", e.message, e.code),
        None => eprintln!("aither: error: refused"),
    }
    EXIT_REFUSED
}

fn payload(text: &str, as_text: bool) -> serde_json::Value {
    if as_text {
        return serde_json::Value::String(text.to_string());
    }
    serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.to_string()))
}

fn publish(a: PubArgs) -> i32 {
    let mut msgs = Vec::new();
    if a.data == "-" {
        let mut s = String::new();
        if let Err(e) = std::io::stdin().read_to_string(&mut s) {
            eprintln!("aither: reading stdin: {e}");
            return EXIT_USAGE;
        }
        if a.lines {
            msgs.extend(s.lines().map(|l| payload(l, a.text)));
        } else {
            msgs.push(payload(s.trim_end_matches('\n'), a.text));
        }
    } else if a.lines {
        eprintln!("aither: --lines needs DATA `-` (stdin)");
        return EXIT_USAGE;
    } else {
        msgs.push(payload(&a.data, a.text));
    }
    let mut c = match connect() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut status = 0;
    for data in msgs {
        let req = Request::BusPub {
            subject: a.subject.clone(),
            data,
            durable: a.durable,
        };
        match c.call(&req) {
            Ok(r) if r.ok => {
                if let Some(seq) = r
                    .data
                    .as_ref()
                    .and_then(|d| d.get("seq"))
                    .and_then(|s| s.as_u64())
                {
                    println!("{seq}");
                }
            }
            Ok(r) => status = refused(&r),
            Err(e) => return client_err(e),
        }
    }
    status
}

fn subscribe(a: SubArgs) -> i32 {
    let mut c = match connect() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let req = Request::BusSub {
        pattern: a.pattern.clone(),
        durable: a.durable.clone(),
        from_seq: a.from,
        since_ms: a.since.map(|d| now_ms().saturating_sub(to_ms(d))),
        queue: a.queue,
    };
    let mut status = 0;
    let mut seen = 0u64;
    let mut acks: Vec<u64> = Vec::new();
    let res = c.stream(&req, |r| {
        if !r.ok {
            status = refused(r);
            return false;
        }
        let Some(d) = r.data.as_ref() else {
            return true;
        };
        if d.get("subscribed").is_some() {
            return true;
        }
        let mut out = std::io::stdout().lock();
        let ok = if a.json {
            writeln!(out, "{d}")
        } else {
            let ts = d.get("ts_ms").and_then(|t| t.as_u64()).unwrap_or(0);
            let seq = d
                .get("seq")
                .and_then(|s| s.as_u64())
                .map_or("-".to_string(), |s| s.to_string());
            let dropped = d.get("dropped").and_then(|x| x.as_u64()).unwrap_or(0);
            if dropped > 0 {
                let _ = writeln!(out, "# {dropped} message(s) dropped (slow subscriber)");
            }
            writeln!(
                out,
                "{}.{:03}Z  {:>8}  {}  {}",
                aither::token::format_time(ts / 1000).trim_end_matches('Z'),
                ts % 1000,
                seq,
                crate::escape::field(d.get("subject").and_then(|s| s.as_str()).unwrap_or("")),
                crate::escape::field(&d.get("data").map(|v| v.to_string()).unwrap_or_default())
            )
        };
        if ok.is_err() || out.flush().is_err() {
            return false;
        }
        if a.ack {
            if let Some(s) = d.get("seq").and_then(|s| s.as_u64()) {
                acks.push(s);
            }
        }
        seen += 1;
        a.count.is_none_or(|n| seen < n)
    });
    if let Err(e) = res {
        return client_err(e);
    }
    if let (Some(name), Some(&last)) = (&a.durable, acks.iter().max()) {
        // Acks travel on their own connection; the consumer's cursor moves to the last one.
        if let Some(code) = ack(name, last, None) {
            return code;
        }
    }
    status
}

fn call_ok(req: &Request) -> i32 {
    let mut c = match connect() {
        Ok(c) => c,
        Err(code) => return code,
    };
    match c.call(req) {
        Ok(r) if r.ok => 0,
        Ok(r) => refused(&r),
        Err(e) => client_err(e),
    }
}

fn ack(name: &str, seq: u64, owner: Option<u32>) -> Option<i32> {
    let mut c = match connect() {
        Ok(c) => c,
        Err(code) => return Some(code),
    };
    match c.call(&Request::BusAck {
        durable: name.to_string(),
        seq,
        owner,
    }) {
        Ok(r) if r.ok => None,
        Ok(r) => Some(refused(&r)),
        Err(e) => Some(client_err(e)),
    }
}

fn streams(a: StreamsArgs) -> i32 {
    let mut c = match connect() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let r = match c.call(&Request::BusStreams) {
        Ok(r) => r,
        Err(e) => return client_err(e),
    };
    if !r.ok {
        return refused(&r);
    }
    let v = r.data.unwrap_or_default();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
        );
        return 0;
    }
    let n = |v: &serde_json::Value| v.as_u64().map_or("-".into(), |x| x.to_string());
    for s in v["streams"].as_array().into_iter().flatten() {
        let l = &s["log"];
        println!(
            "stream {}  first {}  last {}  messages {}  bytes {}  (retention {} bytes, {} s)  {}",
            s["name"].as_str().unwrap_or("?"),
            n(&l["first_seq"]),
            n(&l["last_seq"]),
            n(&l["messages"]),
            n(&l["bytes"]),
            n(&l["max_bytes"]),
            n(&l["max_age_s"]),
            s["path"].as_str().unwrap_or("")
        );
    }
    // Durable consumers with their owners (aitherd shows a member only theirs).
    let cons = v["consumers"].as_array().cloned().unwrap_or_default();
    if !cons.is_empty() {
        println!(
            "{:<8} {:<20} {:<20} {:>10}",
            "OWNER", "AGENT", "CONSUMER", "ACKED"
        );
        for c in cons {
            println!(
                "{:<8} {:<20} {:<20} {:>10}",
                n(&c["owner"]),
                crate::escape::field(c["agent"].as_str().unwrap_or("")),
                crate::escape::field(c["name"].as_str().unwrap_or("")),
                n(&c["acked_seq"])
            );
        }
    }
    let subs = v["subscriptions"].as_array().cloned().unwrap_or_default();
    println!(
        "{:<20} {:>4}  {:<28} {:>7}/{:<7} {:>10} {:>8}  MODE",
        "OWNER", "SUB", "PATTERN", "QUEUED", "CAP", "DELIVERED", "DROPPED"
    );
    for s in subs {
        let mode = match (s["durable"].as_str(), s["catching_up"].as_bool()) {
            (_, Some(true)) => "replaying".to_string(),
            (Some(d), _) => format!("durable {d}"),
            _ if !s["next_seq"].is_null() => "log".into(),
            _ => "live".into(),
        };
        println!(
            "{:<20} {:>4}  {:<28} {:>7}/{:<7} {:>10} {:>8}  {}",
            crate::escape::field(s["owner"].as_str().unwrap_or("")),
            n(&s["sub"]),
            crate::escape::field(s["pattern"].as_str().unwrap_or("")),
            n(&s["queued"]),
            n(&s["capacity"]),
            n(&s["delivered"]),
            n(&s["dropped"]),
            mode
        );
    }
    0
}
