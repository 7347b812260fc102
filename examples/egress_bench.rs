//! Client and upstream for scripts/bench/egress.sh (std only, one thread per connection).
//!
//!   egress_bench serve ADDR
//!       An HTTP/1.1 upstream: `GET /small` → 2 bytes, `GET /bulk/N` → N MiB; keep-alive.
//!   egress_bench latency PROXY|direct HOST:PORT N
//!       N sequential keep-alive GETs of /small (absolute-form through PROXY); reconnects when
//!       the server closes (a proxy without keep-alive pays a connect per request). Prints
//!       `{"p50_us":…,"p99_us":…,"reconnects":…}`.
//!   egress_bench bulk PROXY|direct HOST:PORT MIB
//!       One GET of /bulk/MIB; prints `{"mib_per_s":…}`.
//!
//! HOST may be a name (the proxy resolves it); `direct` needs HOST to be an address.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    match a.get(1).map(String::as_str) {
        Some("serve") => serve(&a[2]),
        Some("latency") => latency(&a[2], &a[3], a[4].parse().expect("N")),
        Some("bulk") => bulk(&a[2], &a[3], a[4].parse().expect("MIB")),
        _ => {
            eprintln!("usage: egress_bench serve ADDR | latency PROXY|direct HOST:PORT N | bulk PROXY|direct HOST:PORT MIB");
            std::process::exit(2);
        }
    }
}

fn serve(addr: &str) {
    let l = TcpListener::bind(addr).expect("bind");
    for c in l.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = c.set_nodelay(true);
            let mut w = c.try_clone().expect("clone");
            let mut r = BufReader::new(c);
            loop {
                let mut first = String::new();
                if r.read_line(&mut first).unwrap_or(0) == 0 {
                    return;
                }
                loop {
                    let mut l = String::new();
                    if r.read_line(&mut l).unwrap_or(0) == 0 {
                        return;
                    }
                    if l == "\r\n" {
                        break;
                    }
                }
                let path = first.split_whitespace().nth(1).unwrap_or("/");
                let path = path
                    .rsplit_once("//")
                    .map_or(path, |(_, p)| p.find('/').map_or("/", |i| &p[i..]));
                if let Some(n) = path.strip_prefix("/bulk/") {
                    let mib: usize = n.parse().unwrap_or(1);
                    let _ = write!(
                        w,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                        mib << 20
                    );
                    let chunk = vec![b'x'; 1 << 20];
                    for _ in 0..mib {
                        if w.write_all(&chunk).is_err() {
                            return;
                        }
                    }
                } else if w
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .is_err()
                {
                    return;
                }
            }
        });
    }
}

struct Conn {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

fn connect(proxy: &str, target: &str) -> Conn {
    let addr = if proxy == "direct" { target } else { proxy };
    let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let _ = s.set_nodelay(true);
    Conn {
        w: s.try_clone().expect("clone"),
        r: BufReader::with_capacity(256 * 1024, s),
    }
}

/// Sends one GET; returns (body bytes, whether the server keeps the connection).
fn get(c: &mut Conn, proxy: &str, target: &str, path: &str) -> Option<(usize, bool)> {
    let line = if proxy == "direct" {
        format!("GET {path} HTTP/1.1\r\nHost: {target}\r\n\r\n")
    } else {
        format!("GET http://{target}{path} HTTP/1.1\r\nHost: {target}\r\n\r\n")
    };
    c.w.write_all(line.as_bytes()).ok()?;
    let mut len = 0usize;
    let mut keep = true;
    let mut status = String::new();
    if c.r.read_line(&mut status).ok()? == 0 {
        return None;
    }
    assert!(status.contains(" 200"), "{status}");
    loop {
        let mut l = String::new();
        if c.r.read_line(&mut l).ok()? == 0 {
            return None;
        }
        if l == "\r\n" {
            break;
        }
        let lower = l.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            len = v.trim().parse().ok()?;
        }
        if lower.starts_with("connection:") && lower.contains("close") {
            keep = false;
        }
    }
    let mut left = len;
    let mut buf = vec![0u8; 256 * 1024];
    while left > 0 {
        let n = c.r.read(&mut buf[..left.min(256 * 1024)]).ok()?;
        if n == 0 {
            return None;
        }
        left -= n;
    }
    Some((len, keep))
}

fn latency(proxy: &str, target: &str, n: usize) {
    let mut c = connect(proxy, target);
    let mut us: Vec<f64> = Vec::with_capacity(n);
    let mut reconnects = 0;
    let warm = n / 10;
    for i in 0..n + warm {
        let t = Instant::now();
        let keep = match get(&mut c, proxy, target, "/small") {
            Some((_, k)) => k,
            None => {
                reconnects += 1;
                c = connect(proxy, target);
                get(&mut c, proxy, target, "/small")
                    .expect("request after reconnect")
                    .1
            }
        };
        if !keep {
            reconnects += 1;
            c = connect(proxy, target);
        }
        if i >= warm {
            us.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    us.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| us[((us.len() as f64 * q) as usize).min(us.len() - 1)];
    println!(
        "{{\"p50_us\":{:.1},\"p99_us\":{:.1},\"reconnects\":{reconnects}}}",
        p(0.50),
        p(0.99)
    );
}

fn bulk(proxy: &str, target: &str, mib: usize) {
    let mut c = connect(proxy, target);
    let t = Instant::now();
    let (len, _) = get(&mut c, proxy, target, &format!("/bulk/{mib}")).expect("bulk GET");
    let s = t.elapsed().as_secs_f64();
    assert_eq!(len, mib << 20);
    println!("{{\"mib_per_s\":{:.0}}}", mib as f64 / s);
}
