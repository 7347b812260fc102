//! Local inference as a service (docs/agents.md): the example model server
//! (agents/model-server.toml, its stand-in server) runs under the `gpu` policy with a lease of
//! aitherd's simulated backend, published as `model.aither.internal`; agents granted the
//! service (`api = "openai"` with token and request quotas in their tokens) call it through
//! the daemon's real egress gateway, which counts each response's `usage` (streaming
//! included) and refuses them over quota with an OpenAI error object, while another agent
//! goes on working; `stats`, the Prometheus metrics and the audit stream show their tokens;
//! an agent without the grant cannot reach the service.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use common::daemon::TestDaemon;
use common::poll_until;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

/// A gpus.toml with one simulated 16 GiB GPU on a stand-in node with NVIDIA's numbers
/// (c 195:0, as tests/gpu.rs makes them; the server only reports its lease, it never opens it).
fn simulated_gpu(dir: &Path) -> std::path::PathBuf {
    let node = dir.join("nvidia0");
    let c = std::ffi::CString::new(node.to_str().unwrap()).unwrap();
    // SAFETY: mknod of a new node in our own temporary directory.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(195, 0)) };
    assert_eq!(rc, 0, "mknod: {}", std::io::Error::last_os_error());
    std::fs::set_permissions(&node, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let p = dir.join("gpus.toml");
    std::fs::write(
        &p,
        format!(
            "backend = \"simulated\"\n[[device]]\nuuid = \"GPU-sim-0\"\ntotal_mb = 16384\nnode = \"{}\"\n",
            node.display()
        ),
    )
    .unwrap();
    p
}

/// A policy file in the workspace: the repository's `standard` plus `net`.
fn policy(d: &TestDaemon, name: &str, net: &str) -> String {
    let src = std::fs::read_to_string(common::policy_dir().join("standard.toml"))
        .unwrap()
        .replace("name = \"standard\"", &format!("name = \"{name}\""));
    let p = d.ws.path().join(format!("{name}.toml"));
    std::fs::write(&p, format!("{src}\n{net}\n")).unwrap();
    p.to_str().unwrap().to_string()
}

fn chat(words: &str, max_tokens: u64) -> Value {
    json!({"path": "/v1/chat/completions",
           "body": {"model": "standin", "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": words}]}})
}

/// Spawns a consumer running tests/inference/client.py with `plan`; its results go to
/// `out-NAME.json` in the workspace (after `wait_for` exists, when given).
fn consumer(d: &TestDaemon, name: &str, policy: &str, plan: &Value, wait_for: Option<&str>) {
    let ws = d.ws.path();
    std::fs::write(ws.join(format!("plan-{name}.json")), plan.to_string()).unwrap();
    let (plan_f, out_f) = (format!("plan-{name}.json"), format!("out-{name}.json"));
    let mut argv = vec!["python3", "-u", "client.py", &plan_f, &out_f];
    if let Some(w) = wait_for {
        argv.push(w);
    }
    let mut args = vec![
        "spawn",
        "--json",
        "--policy",
        policy,
        "-w",
        ws.to_str().unwrap(),
        "--restart",
        "never",
        name,
        "--",
    ];
    args.extend(argv);
    d.ok(&args);
}

fn results(d: &TestDaemon, name: &str) -> Vec<Value> {
    let out = d.ws.path().join(format!("out-{name}.json"));
    let done = poll_until(WAIT, || out.exists());
    assert!(
        done,
        "{name} wrote no results: {}\n{}",
        d.ok(&["logs", name]),
        d.log()
    );
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

fn statuses(r: &[Value]) -> Vec<u64> {
    r.iter().map(|x| x["status"].as_u64().unwrap()).collect()
}

/// The OpenAI error object of a 429.
fn error_of(r: &Value) -> Value {
    let body: Value = serde_json::from_str(r["body"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("the 429 is not JSON ({e}): {r}"));
    body["error"].clone()
}

fn stats(d: &TestDaemon, name: &str) -> Value {
    serde_json::from_str(d.ok(&["stats", "--no-stream", "--json", name]).trim()).unwrap()
}

/// The daemon of a test: the simulated GPU, the Prometheus endpoint on a free loopback
/// port, the scripts in the workspace.
struct Setup {
    d: TestDaemon,
    metrics: String,
    _gpus: tempfile::TempDir,
}

fn setup() -> Setup {
    let gpus = tempfile::Builder::new()
        .prefix("aither-infer-gpu")
        .tempdir_in("/var/tmp")
        .unwrap();
    let gpus_toml = simulated_gpu(gpus.path());
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let d = TestDaemon::start_env(
        "aitherd-infer-",
        &["--metrics", &metrics],
        &[("AITHER_GPUS", gpus_toml.to_str().unwrap())],
    );
    let ws = d.ws.path();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The example agent as a user has it: agents/model-server.toml and its directory.
    std::fs::create_dir_all(ws.join("agents/model-server")).unwrap();
    for (from, to) in [
        ("agents/model-server.toml", "agents/model-server.toml"),
        (
            "agents/model-server/serve.py",
            "agents/model-server/serve.py",
        ),
        ("runtime/python/aither.py", "agents/model-server/aither.py"),
        ("tests/inference/client.py", "client.py"),
        ("tests/inference/hostile.py", "hostile.py"),
    ] {
        std::fs::copy(repo.join(from), ws.join(to)).unwrap();
    }
    Setup {
        d,
        metrics,
        _gpus: gpus,
    }
}

/// Waits for `agent`'s line `PREFIX {json}` in its log.
fn log_line(d: &TestDaemon, agent: &str, prefix: &str) -> String {
    let mut line = None;
    let up = poll_until(WAIT, || {
        line = d
            .ok(&["logs", agent])
            .lines()
            .find_map(|l| l.strip_prefix(prefix).map(str::to_string));
        line.is_some()
    });
    assert!(
        up,
        "{agent} did not start: {}\n{}",
        d.ok(&["logs", agent]),
        d.log()
    );
    line.unwrap()
}

/// The example server: under `gpu`, with its lease, published as `model` (its agent file
/// says so).
fn start_model_server(d: &TestDaemon) {
    d.ok(&["spawn", "--json", "-f", "agents/model-server.toml"]);
    let started: Value =
        serde_json::from_str(&log_line(d, "model-server", "MODEL-SERVER ")).unwrap();
    assert_eq!(started["server"], "standin", "{started}");
    assert_eq!(started["lease"]["granted"], true, "{started}");
    assert_eq!(
        started["lease"]["devices"],
        json!(["/dev/nvidia0"]),
        "{started}"
    );
    let inspect: Value = serde_json::from_str(&d.ok(&["inspect", "model-server"])).unwrap();
    assert_eq!(inspect["policy"], "gpu", "{inspect}");
}

fn metrics_text(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut m = String::new();
    s.read_to_string(&mut m).unwrap();
    m
}

/// The `usage` of `agent`'s usage records in the audit log.
fn usage_records(d: &TestDaemon, agent: &str) -> Vec<Value> {
    d.audit_records()
        .into_iter()
        .filter(|r| r["agent"] == agent && r["data"]["via"] == "usage")
        .map(|r| r["data"]["usage"].clone())
        .collect()
}

fn sum(v: &[Value], k: &str) -> u64 {
    v.iter().map(|u| u[k].as_u64().unwrap()).sum()
}

/// A table's cells (columns are separated by at least two spaces).
fn cells(row: &str) -> Vec<String> {
    row.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect()
}

/// A: 100 tokens a minute. Its three calls cost 43, 42 (streamed, usage in the last SSE
/// chunk) and 41 tokens: the third is admitted at 85 (< 100), the fourth refused at 126.
fn agent_a_runs_into_its_token_quota(d: &TestDaemon) {
    let pol_a = policy(
        d,
        "infer-a",
        "[[net.services]]\nname = \"model\"\napi = \"openai\"\ntokens_per_minute = 100\ntokens_per_day = 100000\n",
    );
    let plan_a = json!([
        chat("one two three", 40),
        {"path": "/v1/chat/completions",
         "body": {"max_tokens": 40, "stream": true, "stream_options": {"include_usage": true},
                  "messages": [{"role": "user", "content": "a b"}]}},
        {"path": "/v1/completions", "body": {"prompt": "x", "max_tokens": 40}},
        chat("hi", 5),
    ]);
    consumer(d, "infer-a", &pol_a, &plan_a, None);
    let a = results(d, "infer-a");
    assert_eq!(statuses(&a), [200, 200, 200, 429], "{a:?}");
    assert_eq!(a[1]["usage"]["total_tokens"], 42, "{a:?}");
    assert_eq!(a[1]["chunks"], 41, "{a:?}");
    let err = error_of(&a[3]);
    assert_eq!(err["type"], "tokens", "{err}");
    assert_eq!(err["code"], "rate_limit_exceeded", "{err}");
    let msg = err["message"].as_str().unwrap();
    assert!(
        msg.contains("token quota reached: 126 of 100 tokens used in the last minute")
            && msg.contains("(net.services.model.tokens_per_minute)"),
        "{msg}"
    );
    assert_eq!(a[3]["rule"], "quota", "{a:?}");
    assert!(
        a[3]["retry_after"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
}

/// B, started once A is refused: 4 requests a minute and plenty of tokens. It keeps working
/// (A's quota is A's), a stream without include_usage is charged the estimate, a GET counts
/// as a request but no tokens, and its fifth request is refused by rpm.
fn agent_b_works_on_until_its_request_quota(d: &TestDaemon) {
    let pol_b = policy(
        d,
        "infer-b",
        "[[net.services]]\nname = \"model\"\napi = \"openai\"\nrequests_per_minute = 4\ntokens_per_minute = 10000\n",
    );
    let plan_b = json!([
        chat("b1", 10),
        {"path": "/v1/chat/completions",
         "body": {"max_tokens": 10, "stream": true, "messages": [{"role": "user", "content": "b2"}]}},
        {"path": "/v1/completions", "body": {"prompt": "b3", "max_tokens": 10}},
        {"path": "/v1/models"},
        chat("b5", 10),
    ]);
    consumer(d, "infer-b", &pol_b, &plan_b, Some("out-infer-a.json"));
    let b = results(d, "infer-b");
    assert_eq!(statuses(&b), [200, 200, 200, 200, 429], "{b:?}");
    assert_eq!(
        b[1]["usage"],
        Value::Null,
        "no usage chunk was asked for: {b:?}"
    );
    assert_eq!(b[1]["chunks"], 10, "{b:?}");
    let err = error_of(&b[4]);
    assert_eq!(err["type"], "requests", "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("4 per minute (net.services.model.requests_per_minute)"),
        "{err}"
    );
}

/// `stats` (JSON and table) and the metrics show the tokens; returns B's.
fn stats_and_metrics_show_the_tokens(s: &Setup) -> u64 {
    let d = &s.d;
    let sa = stats(d, "infer-a");
    assert_eq!(sa["tokens"]["day"], 126, "{sa}");
    // The last minute's (126 unless this host stalled for a minute) and its rate.
    let minute = sa["tokens"]["minute"].as_u64().unwrap();
    assert!(minute <= 126, "{sa}");
    let rate = (minute as f64 / 60.0 * 100.0).round() / 100.0;
    assert_eq!(sa["tokens"]["per_second"].as_f64(), Some(rate), "{sa}");
    assert_eq!(sa["tokens"]["services"][0]["service"], "model", "{sa}");
    assert_eq!(sa["tokens"]["services"][0]["responses"], 3, "{sa}");
    let sb = stats(d, "infer-b");
    let b_tokens = sb["tokens"]["day"].as_u64().unwrap();
    assert!(b_tokens > 22, "11 + 11 + the stream's estimate: {sb}");
    assert_eq!(sb["tokens"]["services"][0]["responses"], 3, "{sb}");
    assert!(stats(d, "infer-c").get("tokens").is_none());
    let table = d.ok(&["stats", "--no-stream", "infer-a", "infer-c"]);
    let header = table.lines().next().unwrap();
    assert!(
        header.contains("TOKENS/24H") && header.contains("TOK/S"),
        "{table}"
    );
    let row_a = cells(table.lines().nth(1).unwrap());
    assert_eq!(row_a[row_a.len() - 2], "126", "{table}");
    assert!(row_a[row_a.len() - 1].parse::<f64>().is_ok(), "{table}");
    let row_c = cells(table.lines().nth(2).unwrap());
    assert_eq!(row_c[row_c.len() - 2..], ["-", "-"], "{table}");

    let m = metrics_text(&s.metrics);
    assert!(
        m.contains("aither_agent_tokens_total{agent=\"infer-a\",service=\"model\"} 126\n"),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "aither_agent_tokens_day{{agent=\"infer-b\",service=\"model\"}} {b_tokens}\n"
        )),
        "{m}"
    );
    assert!(
        m.contains("aither_agent_tokens_per_second{agent=\"infer-a\",service=\"model\"} "),
        "{m}"
    );
    assert!(
        m.contains(
            "aither_agent_inference_responses_total{agent=\"infer-b\",service=\"model\"} 3\n"
        ),
        "{m}"
    );
    b_tokens
}

#[test]
fn two_agents_share_the_model_server_under_their_own_token_quotas() {
    let s = setup();
    let d = &s.d;
    start_model_server(d);
    agent_a_runs_into_its_token_quota(d);
    agent_b_works_on_until_its_request_quota(d);

    // C: its token grants another service, not `model`.
    let pol_c = policy(d, "infer-c", "[[net.services]]\nname = \"other\"\n");
    consumer(d, "infer-c", &pol_c, &json!([chat("c", 1)]), None);
    let c = results(d, "infer-c");
    assert_eq!(statuses(&c), [403], "{c:?}");
    assert!(
        c[0]["body"]
            .as_str()
            .unwrap()
            .contains("aither egress denied (default-deny): no net.services grant for \"model\""),
        "{c:?}"
    );

    let b_tokens = stats_and_metrics_show_the_tokens(&s);

    // The audit stream: the run's usage window of each agent, recorded when its run ends.
    for n in ["infer-a", "infer-b", "infer-c"] {
        d.ok(&["stop", n]);
    }
    let flushed = poll_until(WAIT, || {
        !usage_records(d, "infer-a").is_empty() && !usage_records(d, "infer-b").is_empty()
    });
    assert!(flushed, "no usage records: {:?}", d.audit_records());
    let ua = usage_records(d, "infer-a");
    assert_eq!(sum(&ua, "total_tokens"), 126, "{ua:?}");
    assert_eq!(sum(&ua, "prompt_tokens"), 6, "{ua:?}");
    assert_eq!(sum(&ua, "completion_tokens"), 120, "{ua:?}");
    assert_eq!(sum(&ua, "requests"), 3, "{ua:?}");
    assert_eq!(sum(&ua, "refused"), 1, "{ua:?}");
    assert_eq!(sum(&ua, "estimated"), 0, "{ua:?}");
    assert_eq!(ua[0]["service"], "model", "{ua:?}");
    let ub = usage_records(d, "infer-b");
    assert_eq!(sum(&ub, "total_tokens"), b_tokens, "{ub:?}");
    assert_eq!(sum(&ub, "estimated"), 1, "{ub:?}");
    assert_eq!(sum(&ub, "refused"), 1, "{ub:?}");
    assert!(usage_records(d, "infer-c").is_empty());
    let events = d.ok(&["events", "--json", "--agent", "infer-a"]);
    assert!(events.contains("\"net.usage\""), "{events}");
    d.ok(&["stop", "model-server"]);
}

/// A server that lies, sends no usage, malformed usage, garbage streams or cuts its answer:
/// the gateway charges a clamped figure or the byte estimate, the daemon goes on, and the
/// agent's next honest call is counted exactly. A TLS tunnel to the metered service (which
/// would pass uncounted) is cut.
#[test]
fn a_hostile_model_server_is_counted_clamped_or_estimated_and_harms_nothing() {
    let s = setup();
    let d = &s.d;
    let ws = d.ws.path().to_str().unwrap().to_string();
    d.ok(&[
        "spawn",
        "--json",
        "--policy",
        "standard",
        "-w",
        &ws,
        "--publish",
        "model=8000",
        "hostile",
        "--",
        "python3",
        "-u",
        "hostile.py",
    ]);
    log_line(d, "hostile", "HOSTILE up");
    let pol = policy(
        d,
        "infer-h",
        "[[net.services]]\nname = \"model\"\napi = \"openai\"\ntokens_per_day = 100000000\n",
    );
    let post = |p: &str| json!({"path": p, "body": {"prompt": "p"}});
    let plan = json!([
        post("/v1/lie"),
        post("/v1/overflow"),
        post("/v1/negative"),
        post("/v1/none"),
        post("/v1/nested"),
        {"path": "/v1/sse", "body": {"stream": true}},
        post("/v1/cut"),
        {"path": "/v1/ok", "body": {"prompt": "p"}, "headers": {"Accept-Encoding": "gzip, br"}},
        // 40,000 bytes of prompt, chunked (no Content-Length), and no usage in the answer:
        // the estimate counts the bytes that went out.
        {"path": "/v1/none", "body": {"prompt": "w".repeat(40_000)}, "chunked": true},
    ]);
    consumer(d, "infer-h", &pol, &plan, None);
    let h = results(d, "infer-h");
    assert_eq!(
        statuses(&h),
        [200, 200, 200, 200, 200, 200, 0, 200, 200],
        "{h:?}"
    );
    assert_eq!(h[5]["usage"]["total_tokens"], 7, "{h:?}");
    assert_eq!(h[7]["usage"]["total_tokens"], 5, "{h:?}");
    // The agent asked for a compressed answer; the server was asked for an uncompressed one.
    assert_eq!(h[7]["seen"]["accept-encoding"], "identity", "{h:?}");
    // The daemon is unharmed.
    d.ok(&["ps"]);
    let sh = stats(d, "infer-h");
    assert_eq!(sh["tokens"]["services"][0]["responses"], 9, "{sh}");
    let day = sh["tokens"]["day"].as_u64().unwrap();
    // 2^21 for the lie, 7 and 5 exactly, five small estimates (each under 100 tokens: the
    // request and response bodies are well under 400 bytes) and the chunked one's, 40,000
    // bytes and a little: just over 10,000.
    let exact = (1u64 << 21) + 7 + 5 + 10_000;
    assert!(day > exact && day < exact + 600, "{sh}");

    // A TLS tunnel to the metered service is cut at its first flight.
    let tls = policy(
        d,
        "infer-tls",
        "[[net.services]]\nname = \"model\"\napi = \"openai\"\n",
    );
    d.ok(&[
        "spawn",
        "--json",
        "--policy",
        &tls,
        "-w",
        &ws,
        "--restart",
        "never",
        "infer-tls",
        "--",
        "sh",
        "-c",
        "curl -sk -m 10 https://model.aither.internal/v1/models > tls.out 2>&1; echo $? > tls.rc",
    ]);
    let rc = d.ws.path().join("tls.rc");
    assert!(poll_until(WAIT, || rc.exists()), "{}", d.log());
    let code = std::fs::read_to_string(&rc).unwrap();
    assert_ne!(code.trim(), "0", "the TLS tunnel went through");
    let events = d.ok(&["events", "--json", "--agent", "infer-tls"]);
    assert!(
        events.contains("counts tokens (api = \\\"openai\\\"): plain HTTP only"),
        "{events}"
    );

    d.ok(&["stop", "infer-h"]);
    let flushed = poll_until(WAIT, || !usage_records(d, "infer-h").is_empty());
    assert!(flushed, "no usage record: {:?}", d.audit_records());
    let uh = usage_records(d, "infer-h");
    assert_eq!(sum(&uh, "requests"), 9, "{uh:?}");
    assert_eq!(sum(&uh, "clamped"), 1, "{uh:?}");
    assert_eq!(sum(&uh, "estimated"), 6, "{uh:?}");
    assert_eq!(sum(&uh, "total_tokens"), day, "{uh:?}");

    // The ledger outlives the run and the daemon: stored with the quota state, read back by a
    // new aitherd (kill -9), charged on by the agent's next run under the same token.
    let db = d.state.path().join("state/state.db");
    let stored = poll_until(WAIT, || {
        rusqlite::Connection::open(&db)
            .and_then(|c| {
                c.query_row(
                    "SELECT state FROM net_quota WHERE name = 'infer-h'",
                    [],
                    |r| r.get::<_, String>(0),
                )
            })
            .is_ok_and(|t| {
                serde_json::from_str::<Value>(&t).unwrap()["services_tokens"]["model"]["total"]
                    == day
            })
    });
    assert!(stored, "the token ledger was not stored");
    let mut s = s;
    s.d.kill9();
    s.d.launch();
    let d = &s.d;
    std::fs::remove_file(d.ws.path().join("out-infer-h.json")).unwrap();
    d.ok(&["restart", "infer-h"]);
    let again = results(d, "infer-h");
    assert_eq!(statuses(&again), statuses(&h), "{again:?}");
    let sh = stats(d, "infer-h");
    assert_eq!(sh["tokens"]["services"][0]["responses"], 18, "{sh}");
    assert!(sh["tokens"]["day"].as_u64().unwrap() > day + exact, "{sh}");
    for n in ["hostile", "infer-tls", "infer-h"] {
        d.ok(&["stop", n]);
    }
}

/// `aitherctl run` (the in-process gateway) with a metered service on the host, granted by
/// `target`: the example server run on the host without aitherd, the run's agent refused
/// over its token quota, its usage record in the audit log when the run ends.
#[test]
fn aitherctl_run_meters_a_host_model_server_granted_by_target() {
    let ws = common::Workspace::new();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let server_dir = tempfile::Builder::new()
        .prefix("aither-infer-host")
        .tempdir_in("/var/tmp")
        .unwrap();
    for (from, to) in [
        (
            "agents/model-server/serve.py",
            server_dir.path().join("serve.py"),
        ),
        (
            "runtime/python/aither.py",
            server_dir.path().join("aither.py"),
        ),
        ("tests/inference/client.py", ws.path().join("client.py")),
    ] {
        std::fs::copy(repo.join(from), to).unwrap();
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = std::process::Command::new("python3")
        .arg(server_dir.path().join("serve.py"))
        .env("PORT", port.to_string())
        .env_remove("AITHER_FD")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("python3 (install.sh installs it)");
    let up = poll_until(WAIT, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(up, "the host's model server did not listen on {port}");

    let src = std::fs::read_to_string(common::policy_dir().join("standard.toml"))
        .unwrap()
        .replace("name = \"standard\"", "name = \"infer-run\"");
    let pol = ws.path().join("infer-run.toml");
    std::fs::write(
        &pol,
        format!(
            "{src}\n[[net.services]]\nname = \"model\"\ntarget = \"127.0.0.1:{port}\"\napi = \"openai\"\ntokens_per_minute = 50\n"
        ),
    )
    .unwrap();
    // 33 tokens, then 31 (admitted at 33 < 50), then refused at 64.
    let plan = json!([chat("a b c", 30), chat("x", 30), chat("y", 1)]);
    std::fs::write(ws.path().join("plan.json"), plan.to_string()).unwrap();
    let r = ws.run(
        pol.to_str().unwrap(),
        &["--env", "INFER_CLIENT_ONESHOT=1"],
        &["python3", "-u", "client.py", "plan.json", "out.json"],
    );
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(r.code(), 0, "{}", r.describe());
    let out: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(ws.path().join("out.json")).unwrap())
            .unwrap();
    assert_eq!(statuses(&out), [200, 200, 429], "{out:?}");
    let err = error_of(&out[2]);
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("token quota reached: 64 of 50 tokens"),
        "{err}"
    );
    // The run's usage window, recorded when the run ended.
    let log = std::fs::read_to_string(common::test_audit_log()).unwrap_or_default();
    let usage: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["agent"] == r.name.as_str() && v["data"]["via"] == "usage")
        .map(|v| v["data"]["usage"].clone())
        .collect();
    assert_eq!(sum(&usage, "total_tokens"), 64, "{usage:?}");
    assert_eq!(sum(&usage, "refused"), 1, "{usage:?}");
}
