//! The AitherFlux benchmark client (scripts/bench/bus.sh): the same measurements against
//! aitherd's bus (control socket, operator) and redis-server PUBLISH/SUBSCRIBE on loopback.
//!
//! usage: bus_bench AITHER_SOCKET REDIS_PORT [N]
//!
//! Prints one JSON object with both sides' results.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const PAYLOAD: usize = 128;

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A payload of PAYLOAD bytes carrying its send time.
fn payload() -> String {
    let mut s = format!("t{}|", now_ns());
    while s.len() < PAYLOAD {
        s.push('x');
    }
    s
}

fn sent_ns(p: &str) -> Option<u128> {
    let i = p.find('t')?;
    let j = p[i..].find('|')?;
    p[i + 1..i + j].parse().ok()
}

trait Side: Send + Sync {
    fn name(&self) -> &'static str;
    /// A subscriber that sends each message's payload (or just a tick) down `tx`.
    fn subscribe(&self, subject: &str, tx: mpsc::Sender<u128>, ready: mpsc::Sender<()>);
    /// Publishes `n` messages pipelined; returns when every reply is in.
    fn publish(&self, subject: &str, n: usize, durable: bool);
    /// A publisher for one-at-a-time sends.
    fn publisher(&self) -> Box<dyn FnMut(&str)>;
}

// ---------------------------------------------------------------- aither

struct Aither {
    socket: String,
}

fn frame(v: &serde_json::Value) -> Vec<u8> {
    let b = serde_json::to_vec(v).unwrap();
    let mut out = (b.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&b);
    out
}

fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> bool {
    let mut h = [0u8; 4];
    if r.read_exact(&mut h).is_err() {
        return false;
    }
    buf.resize(u32::from_be_bytes(h) as usize, 0);
    r.read_exact(buf).is_ok()
}

impl Side for Aither {
    fn name(&self) -> &'static str {
        "aither"
    }

    fn subscribe(&self, subject: &str, tx: mpsc::Sender<u128>, ready: mpsc::Sender<()>) {
        let mut s = UnixStream::connect(&self.socket).unwrap();
        s.write_all(&frame(
            &serde_json::json!({"op": "bus_sub", "pattern": subject, "queue": 65536}),
        ))
        .unwrap();
        thread::spawn(move || {
            let mut r = BufReader::with_capacity(1 << 16, s);
            let mut buf = Vec::new();
            read_frame(&mut r, &mut buf);
            let _ = ready.send(());
            while read_frame(&mut r, &mut buf) {
                let now = now_ns();
                let v: serde_json::Value = match serde_json::from_slice(&buf) {
                    Ok(v) => v,
                    Err(_) => continue,
                };
                let sent = v["data"]["data"].as_str().and_then(sent_ns).unwrap_or(now);
                if tx.send(now.saturating_sub(sent)).is_err() {
                    return;
                }
            }
        });
    }

    fn publish(&self, subject: &str, n: usize, durable: bool) {
        let s = UnixStream::connect(&self.socket).unwrap();
        let mut r = BufReader::with_capacity(1 << 16, s.try_clone().unwrap());
        let reader = thread::spawn(move || {
            let mut buf = Vec::new();
            for _ in 0..n {
                assert!(read_frame(&mut r, &mut buf), "aitherd closed the publisher");
            }
        });
        let mut w = BufWriter::with_capacity(1 << 16, s);
        for _ in 0..n {
            w.write_all(&frame(&serde_json::json!({
                "op": "bus_pub", "subject": subject, "data": payload(), "durable": durable
            })))
            .unwrap();
        }
        w.flush().unwrap();
        reader.join().unwrap();
    }

    fn publisher(&self) -> Box<dyn FnMut(&str)> {
        let mut s = UnixStream::connect(&self.socket).unwrap();
        let mut buf = Vec::new();
        Box::new(move |subject| {
            s.write_all(&frame(&serde_json::json!({
                "op": "bus_pub", "subject": subject, "data": payload()
            })))
            .unwrap();
            read_frame(&mut s, &mut buf);
        })
    }
}

// ---------------------------------------------------------------- redis

struct Redis {
    port: u16,
}

fn resp(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n{}\r\n", a.len(), a).as_bytes());
    }
    out
}

/// Reads one RESP value; returns its bulk strings (arrays flattened) or the simple line.
fn read_resp(r: &mut impl BufRead, out: &mut Vec<String>) -> bool {
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return false;
    }
    let line = line.trim_end();
    match line.as_bytes().first() {
        Some(b'*') => {
            let n: i64 = line[1..].parse().unwrap_or(0);
            for _ in 0..n.max(0) {
                if !read_resp(r, out) {
                    return false;
                }
            }
            true
        }
        Some(b'$') => {
            let n: i64 = line[1..].parse().unwrap_or(-1);
            if n < 0 {
                return true;
            }
            let mut b = vec![0u8; n as usize + 2];
            if r.read_exact(&mut b).is_err() {
                return false;
            }
            b.truncate(n as usize);
            out.push(String::from_utf8_lossy(&b).into_owned());
            true
        }
        _ => {
            out.push(line.to_string());
            true
        }
    }
}

impl Side for Redis {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn subscribe(&self, subject: &str, tx: mpsc::Sender<u128>, ready: mpsc::Sender<()>) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_nodelay(true).unwrap();
        s.write_all(&resp(&["SUBSCRIBE", subject])).unwrap();
        thread::spawn(move || {
            let mut r = BufReader::with_capacity(1 << 16, s);
            let mut v = Vec::new();
            read_resp(&mut r, &mut v);
            let _ = ready.send(());
            loop {
                v.clear();
                if !read_resp(&mut r, &mut v) {
                    return;
                }
                let now = now_ns();
                let sent = v.get(2).and_then(|p| sent_ns(p)).unwrap_or(now);
                if tx.send(now.saturating_sub(sent)).is_err() {
                    return;
                }
            }
        });
    }

    fn publish(&self, subject: &str, n: usize, durable: bool) {
        let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_nodelay(true).unwrap();
        let mut r = BufReader::with_capacity(1 << 16, s.try_clone().unwrap());
        let reader = thread::spawn(move || {
            let mut v = Vec::new();
            for _ in 0..n {
                assert!(read_resp(&mut r, &mut v), "redis closed the publisher");
                v.clear();
            }
        });
        let mut w = BufWriter::with_capacity(1 << 16, s);
        for _ in 0..n {
            let p = payload();
            let cmd = if durable {
                // Redis's log: a stream entry (XADD), the nearest to a durable publish.
                resp(&["XADD", subject, "*", "d", &p])
            } else {
                resp(&["PUBLISH", subject, &p])
            };
            w.write_all(&cmd).unwrap();
        }
        w.flush().unwrap();
        reader.join().unwrap();
    }

    fn publisher(&self) -> Box<dyn FnMut(&str)> {
        let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_nodelay(true).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        let mut v = Vec::new();
        Box::new(move |subject| {
            w.write_all(&resp(&["PUBLISH", subject, &payload()]))
                .unwrap();
            v.clear();
            read_resp(&mut r, &mut v);
        })
    }
}

// ---------------------------------------------------------------- measurements

fn pct(v: &mut [u128], p: f64) -> f64 {
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i] as f64 / 1000.0
}

/// 1→k: k subscribers, n messages pipelined; deliveries per second and wall time.
fn fanout(side: &dyn Side, subject: &str, k: usize, n: usize) -> f64 {
    let (tx, rx) = mpsc::channel();
    let (rtx, rrx) = mpsc::channel();
    for _ in 0..k {
        side.subscribe(subject, tx.clone(), rtx.clone());
    }
    for _ in 0..k {
        rrx.recv_timeout(Duration::from_secs(10)).unwrap();
    }
    thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    let subj = subject.to_string();
    let p = thread::scope(|s| {
        s.spawn(|| side.publish(&subj, n, false));
        let mut got = 0;
        while got < n * k {
            if rx.recv_timeout(Duration::from_secs(30)).is_err() {
                break;
            }
            got += 1;
        }
        got
    });
    let dt = t0.elapsed().as_secs_f64();
    if p < n * k {
        eprintln!(
            "{}: {subject}: only {p} of {} deliveries",
            side.name(),
            n * k
        );
    }
    p as f64 / dt
}

/// One message at a time: publish, wait for it at the subscriber; latency samples in µs.
fn latency(side: &dyn Side, subject: &str, n: usize) -> (f64, f64, f64) {
    let (tx, rx) = mpsc::channel();
    let (rtx, rrx) = mpsc::channel();
    side.subscribe(subject, tx, rtx);
    rrx.recv_timeout(Duration::from_secs(10)).unwrap();
    thread::sleep(Duration::from_millis(100));
    let mut publish = side.publisher();
    let mut v = Vec::with_capacity(n);
    for i in 0..n + 200 {
        publish(subject);
        let l = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        if i >= 200 {
            v.push(l);
        }
    }
    (pct(&mut v, 0.5), pct(&mut v, 0.99), pct(&mut v, 0.999))
}

fn durable(side: &dyn Side, subject: &str, n: usize) -> f64 {
    let t0 = Instant::now();
    side.publish(subject, n, true);
    n as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let socket = args
        .get(1)
        .expect("usage: bus_bench AITHER_SOCKET REDIS_PORT [N]")
        .clone();
    let port: u16 = args
        .get(2)
        .and_then(|p| p.parse().ok())
        .expect("REDIS_PORT");
    let n: usize = args.get(3).and_then(|p| p.parse().ok()).unwrap_or(100_000);
    let sides: Vec<Box<dyn Side>> = vec![Box::new(Aither { socket }), Box::new(Redis { port })];
    let mut out = serde_json::Map::new();
    for side in &sides {
        let s = side.as_ref();
        let one = fanout(s, "bench.one", 1, n);
        let (p50, p99, p999) = latency(s, "bench.lat", 5_000);
        let fan = fanout(s, "bench.fan", 16, n / 8);
        let dur = durable(s, "bench.durable", n / 2);
        eprintln!(
            "{:>6}: 1→1 {:>9.0} msg/s   p50 {:>6.1} µs  p99 {:>6.1} µs  p99.9 {:>6.1} µs   1→16 {:>9.0} deliveries/s   durable {:>9.0} msg/s",
            s.name(), one, p50, p99, p999, fan, dur
        );
        out.insert(
            s.name().into(),
            serde_json::json!({
                "one_to_one_msgs_per_s": one.round(),
                "p50_us": p50, "p99_us": p99, "p999_us": p999,
                "fanout16_deliveries_per_s": fan.round(),
                "durable_msgs_per_s": dur.round(),
            }),
        );
    }
    out.insert("messages".into(), n.into());
    out.insert("payload_bytes".into(), PAYLOAD.into());
    println!("{}", serde_json::Value::Object(out));
}
