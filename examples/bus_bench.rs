//! The AitherFlux benchmark client (scripts/bench/bus.sh): the same measurements against
//! aitherd's bus (control socket, operator) and redis-server PUBLISH/SUBSCRIBE on loopback,
//! interleaved: every measurement runs on one side and then on the other before the next, the
//! order alternating by round, so that both see the same load of the host.
//!
//! usage: bus_bench AITHER_SOCKET REDIS_PORT [N] [ROUNDS]
//!
//! Prints one JSON object: each round's results per side, and the median per side.
//!
//! Both clients do the same small work per message: framing (aither's length prefix, redis's
//! RESP) and finding the payload's send time; neither decodes the rest (a JSON parse of each
//! delivery would be the client's cost, not the server's, and on a small host it takes CPU
//! from the server being measured).

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpStream};
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

/// The send time in a delivery: the digits after the last `"t` (aither: the JSON string;
/// redis: the bulk string) up to `|`.
fn sent_ns(p: &[u8]) -> Option<u128> {
    let bar = p.iter().rposition(|&b| b == b'|')?;
    let t = p[..bar].iter().rposition(|&b| b == b't')?;
    std::str::from_utf8(&p[t + 1..bar]).ok()?.parse().ok()
}

/// Closes a subscriber's connection (its thread then ends).
type Closer = Box<dyn FnOnce() + Send>;

/// Flow control of a throughput publisher, the same for both sides: it stays at most
/// `window` messages ahead of what every subscriber has received. Both servers bound what
/// they hold for a slow subscriber (aitherd: 1 MiB per subscription, then drop-oldest;
/// redis: 32 MB, then disconnect), so an unpaced publisher on a busy host measures those
/// buffers, not throughput. WINDOW messages fit in aitherd's bound.
struct Gate {
    /// Deliveries counted so far, all subscribers together.
    delivered: std::sync::Mutex<usize>,
    cv: std::sync::Condvar,
    subscribers: usize,
    window: usize,
}

const WINDOW: usize = 2048;

impl Gate {
    fn new(subscribers: usize) -> Gate {
        Gate {
            delivered: std::sync::Mutex::new(0),
            cv: std::sync::Condvar::new(),
            subscribers,
            window: WINDOW,
        }
    }

    /// Waits until message `sent` may go (flushing `w` first); panics after 5 s without
    /// room (deliveries were lost).
    fn room(&self, sent: usize, w: &mut impl Write) {
        let ahead = |d: usize| sent.saturating_sub(d / self.subscribers) >= self.window;
        let mut d = self.delivered.lock().unwrap();
        if !ahead(*d) {
            return;
        }
        drop(d);
        w.flush().unwrap();
        d = self.delivered.lock().unwrap();
        while ahead(*d) {
            let (g, t) = self.cv.wait_timeout(d, Duration::from_secs(5)).unwrap();
            d = g;
            assert!(
                !(t.timed_out() && ahead(*d)),
                "no delivery for 5 s: {} of {sent} messages delivered",
                *d / self.subscribers
            );
        }
    }

    fn add(&self, got: usize) {
        *self.delivered.lock().unwrap() = got;
        self.cv.notify_all();
    }
}

trait Side: Send + Sync {
    fn name(&self) -> &'static str;
    /// A subscriber that sends each message's latency down `tx`.
    fn subscribe(&self, subject: &str, tx: mpsc::Sender<u128>, ready: mpsc::Sender<()>) -> Closer;
    /// Publishes `n` messages pipelined (paced by `gate`); returns when every reply is in.
    fn publish(&self, subject: &str, n: usize, durable: bool, gate: Option<&Gate>);
    /// A publisher for one-at-a-time sends.
    fn publisher(&self) -> Box<dyn FnMut(&str)>;
}

// ---------------------------------------------------------------- aither

struct Aither {
    socket: String,
}

fn pub_frame(subject: &str, durable: bool) -> Vec<u8> {
    // The payload is printable ASCII without quotes or backslashes: no escaping needed.
    let body = format!(
        "{{\"op\":\"bus_pub\",\"subject\":\"{subject}\",\"data\":\"{}\",\"durable\":{durable}}}",
        payload()
    );
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body.as_bytes());
    out
}

/// Deliveries aitherd reports it dropped (the `dropped` of each delivery: a subscriber that
/// fell more than its queue behind), so that a short count says where the messages went.
static AITHER_DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn dropped_of(frame: &[u8]) -> u64 {
    let key = b"\"dropped\":";
    let Some(at) = frame.windows(key.len()).position(|w| w == key) else {
        return 0;
    };
    frame[at + key.len()..]
        .iter()
        .take_while(|c| c.is_ascii_digit())
        .fold(0, |n, c| n * 10 + u64::from(c - b'0'))
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

    fn subscribe(&self, subject: &str, tx: mpsc::Sender<u128>, ready: mpsc::Sender<()>) -> Closer {
        let mut s = UnixStream::connect(&self.socket).unwrap();
        let body = format!("{{\"op\":\"bus_sub\",\"pattern\":\"{subject}\",\"queue\":65536}}");
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body.as_bytes());
        s.write_all(&f).unwrap();
        let closer = s.try_clone().unwrap();
        thread::spawn(move || {
            let mut r = BufReader::with_capacity(1 << 16, s);
            let mut buf = Vec::new();
            read_frame(&mut r, &mut buf);
            assert!(
                buf.starts_with(b"{\"ok\":true"),
                "aitherd refused the subscription: {}",
                String::from_utf8_lossy(&buf)
            );
            let _ = ready.send(());
            while read_frame(&mut r, &mut buf) {
                let now = now_ns();
                let sent = sent_ns(&buf).unwrap_or(now);
                let lost = dropped_of(&buf);
                if lost > 0 {
                    AITHER_DROPPED.fetch_add(lost, std::sync::atomic::Ordering::Relaxed);
                }
                if tx.send(now.saturating_sub(sent)).is_err() {
                    return;
                }
            }
        });
        Box::new(move || {
            let _ = closer.shutdown(Shutdown::Both);
        })
    }

    fn publish(&self, subject: &str, n: usize, durable: bool, gate: Option<&Gate>) {
        let s = UnixStream::connect(&self.socket).unwrap();
        let mut r = BufReader::with_capacity(1 << 16, s.try_clone().unwrap());
        let reader = thread::spawn(move || {
            let mut buf = Vec::new();
            for _ in 0..n {
                assert!(read_frame(&mut r, &mut buf), "aitherd closed the publisher");
                assert!(
                    buf.starts_with(b"{\"ok\":true"),
                    "aitherd refused a publish: {}",
                    String::from_utf8_lossy(&buf)
                );
            }
        });
        let mut w = BufWriter::with_capacity(1 << 16, s);
        for i in 0..n {
            if let Some(g) = gate {
                g.room(i, &mut w);
            }
            w.write_all(&pub_frame(subject, durable)).unwrap();
        }
        w.flush().unwrap();
        reader.join().unwrap();
    }

    fn publisher(&self) -> Box<dyn FnMut(&str)> {
        let mut s = UnixStream::connect(&self.socket).unwrap();
        let mut buf = Vec::new();
        Box::new(move |subject| {
            s.write_all(&pub_frame(subject, false)).unwrap();
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

/// A RESP reader that keeps its buffers: one value's bulk strings and simple lines, arrays
/// flattened, in `items[..len]`.
#[derive(Default)]
struct Resp {
    line: Vec<u8>,
    items: Vec<Vec<u8>>,
    len: usize,
}

impl Resp {
    fn read(&mut self, r: &mut impl BufRead) -> bool {
        self.len = 0;
        self.value(r)
    }

    fn item(&mut self) -> &mut Vec<u8> {
        if self.items.len() == self.len {
            self.items.push(Vec::new());
        }
        self.len += 1;
        let it = &mut self.items[self.len - 1];
        it.clear();
        it
    }

    fn value(&mut self, r: &mut impl BufRead) -> bool {
        self.line.clear();
        if r.read_until(b'\n', &mut self.line).unwrap_or(0) == 0 {
            return false;
        }
        while matches!(self.line.last(), Some(b'\n' | b'\r')) {
            self.line.pop();
        }
        let num = |l: &[u8]| -> i64 {
            std::str::from_utf8(&l[1..])
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(-1)
        };
        match self.line.first() {
            Some(b'*') => {
                for _ in 0..num(&self.line).max(0) {
                    if !self.value(r) {
                        return false;
                    }
                }
                true
            }
            Some(b'$') => {
                let n = num(&self.line);
                if n < 0 {
                    return true;
                }
                let it = self.item();
                it.resize(n as usize + 2, 0);
                if r.read_exact(it).is_err() {
                    return false;
                }
                it.truncate(n as usize);
                true
            }
            _ => {
                let line = std::mem::take(&mut self.line);
                self.item().extend_from_slice(&line);
                self.line = line;
                true
            }
        }
    }

    fn get(&self, i: usize) -> Option<&[u8]> {
        (i < self.len).then(|| self.items[i].as_slice())
    }
}

impl Side for Redis {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn subscribe(&self, subject: &str, tx: mpsc::Sender<u128>, ready: mpsc::Sender<()>) -> Closer {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_nodelay(true).unwrap();
        s.write_all(&resp(&["SUBSCRIBE", subject])).unwrap();
        let closer = s.try_clone().unwrap();
        thread::spawn(move || {
            let mut r = BufReader::with_capacity(1 << 16, s);
            let mut v = Resp::default();
            v.read(&mut r);
            let _ = ready.send(());
            loop {
                if !v.read(&mut r) {
                    return;
                }
                let now = now_ns();
                let sent = v.get(2).and_then(sent_ns).unwrap_or(now);
                if tx.send(now.saturating_sub(sent)).is_err() {
                    return;
                }
            }
        });
        Box::new(move || {
            let _ = closer.shutdown(Shutdown::Both);
        })
    }

    fn publish(&self, subject: &str, n: usize, durable: bool, gate: Option<&Gate>) {
        let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_nodelay(true).unwrap();
        let mut r = BufReader::with_capacity(1 << 16, s.try_clone().unwrap());
        let reader = thread::spawn(move || {
            let mut v = Resp::default();
            for _ in 0..n {
                assert!(v.read(&mut r), "redis closed the publisher");
            }
        });
        let mut w = BufWriter::with_capacity(1 << 16, s);
        for i in 0..n {
            if let Some(g) = gate {
                g.room(i, &mut w);
            }
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
        let mut v = Resp::default();
        Box::new(move |subject| {
            w.write_all(&resp(&["PUBLISH", subject, &payload()]))
                .unwrap();
            v.read(&mut r);
        })
    }
}

// ---------------------------------------------------------------- measurements

fn pct(v: &mut [u128], p: f64) -> f64 {
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i] as f64 / 1000.0
}

/// 1→k: k subscribers, n messages pipelined; deliveries per second.
fn fanout(side: &dyn Side, subject: &str, k: usize, n: usize) -> f64 {
    let (tx, rx) = mpsc::channel();
    let (rtx, rrx) = mpsc::channel();
    let closers: Vec<Closer> = (0..k)
        .map(|_| side.subscribe(subject, tx.clone(), rtx.clone()))
        .collect();
    for _ in 0..k {
        rrx.recv_timeout(Duration::from_secs(10)).unwrap();
    }
    thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    let subj = subject.to_string();
    let gate = Gate::new(k);
    let p = thread::scope(|s| {
        s.spawn(|| side.publish(&subj, n, false, Some(&gate)));
        let mut got = 0;
        while got < n * k {
            if rx.recv_timeout(Duration::from_secs(10)).is_err() {
                break;
            }
            got += 1;
            if got % 128 == 0 {
                gate.add(got);
            }
        }
        gate.add(got);
        got
    });
    let dt = t0.elapsed().as_secs_f64();
    for c in closers {
        c();
    }
    if p < n * k {
        eprintln!(
            "{}: {subject}: only {p} of {} deliveries (aitherd reported {} dropped so far)",
            side.name(),
            n * k,
            AITHER_DROPPED.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    p as f64 / dt
}

/// One message at a time: publish, wait for it at the subscriber; latency samples in µs.
fn latency(side: &dyn Side, subject: &str, n: usize) -> (f64, f64, f64) {
    let (tx, rx) = mpsc::channel();
    let (rtx, rrx) = mpsc::channel();
    let close = side.subscribe(subject, tx, rtx);
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
    close();
    (pct(&mut v, 0.5), pct(&mut v, 0.99), pct(&mut v, 0.999))
}

fn durable(side: &dyn Side, subject: &str, n: usize) -> f64 {
    let t0 = Instant::now();
    side.publish(subject, n, true, None);
    n as f64 / t0.elapsed().as_secs_f64()
}

const KEYS: [&str; 6] = [
    "one_to_one_msgs_per_s",
    "p50_us",
    "p99_us",
    "p999_us",
    "fanout16_deliveries_per_s",
    "durable_msgs_per_s",
];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let socket = args
        .get(1)
        .expect("usage: bus_bench AITHER_SOCKET REDIS_PORT [N] [ROUNDS]")
        .clone();
    let port: u16 = args
        .get(2)
        .and_then(|p| p.parse().ok())
        .expect("REDIS_PORT");
    let n: usize = args.get(3).and_then(|p| p.parse().ok()).unwrap_or(100_000);
    let rounds: usize = args.get(4).and_then(|p| p.parse().ok()).unwrap_or(5);
    let sides: Vec<Box<dyn Side>> = vec![Box::new(Aither { socket }), Box::new(Redis { port })];
    // results[side][key] per round
    let mut per_round: Vec<[[f64; 6]; 2]> = Vec::new();
    for round in 0..rounds {
        // Alternate which side goes first, so that neither always runs on a warmer host.
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut res = [[0f64; 6]; 2];
        let sub = |what: &str| format!("bench.{what}.r{round}");
        for &i in &order {
            res[i][0] = fanout(sides[i].as_ref(), &sub("one"), 1, n);
        }
        for &i in &order {
            let (p50, p99, p999) = latency(sides[i].as_ref(), &sub("lat"), 5_000);
            res[i][1] = p50;
            res[i][2] = p99;
            res[i][3] = p999;
        }
        for &i in &order {
            res[i][4] = fanout(sides[i].as_ref(), &sub("fan"), 16, n / 8);
        }
        for &i in &order {
            res[i][5] = durable(sides[i].as_ref(), &sub("durable"), n / 2);
        }
        for (i, s) in sides.iter().enumerate() {
            let r = res[i];
            eprintln!(
                "round {round} {:>6}: 1→1 {:>9.0} msg/s   p50 {:>6.1} µs  p99 {:>6.1} µs  p99.9 {:>6.1} µs   1→16 {:>9.0} deliveries/s   durable {:>9.0} msg/s",
                s.name(), r[0], r[1], r[2], r[3], r[4], r[5]
            );
        }
        per_round.push(res);
    }
    let obj = |r: &[f64; 6]| {
        serde_json::Value::Object(
            KEYS.iter()
                .zip(r)
                .map(|(k, v)| (k.to_string(), serde_json::json!((v * 10.0).round() / 10.0)))
                .collect(),
        )
    };
    let mut out = serde_json::Map::new();
    for (i, s) in sides.iter().enumerate() {
        let mut med = [0f64; 6];
        for (k, m) in med.iter_mut().enumerate() {
            *m = median(per_round.iter().map(|r| r[i][k]).collect());
        }
        out.insert(s.name().into(), obj(&med));
    }
    out.insert(
        "rounds".into(),
        per_round
            .iter()
            .map(|r| serde_json::json!({"aither": obj(&r[0]), "redis": obj(&r[1])}))
            .collect(),
    );
    out.insert("messages".into(), n.into());
    out.insert("payload_bytes".into(), PAYLOAD.into());
    println!("{}", serde_json::Value::Object(out));
}
