//! strict must still run real agent work: Python with threads, subprocesses, multiprocessing
//! and ptys; git; gcc; make; SQLite in WAL mode. Everything runs in a temporary workspace
//! under `aitherctl run --policy strict`, and what the agent creates there must belong, on the
//! host, to the workspace's owner (root). Needs root; fails loudly without it.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::Workspace;

const STRICT: &str = "strict";

/// Asserts that `rel` (relative to the workspace) exists and is owned by root on the host.
fn assert_owned_by_root(ws: &Workspace, rel: &str) {
    let p = ws.path().join(rel);
    let md = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert_eq!(
        (md.uid(), md.gid()),
        (0, 0),
        "{} is owned by {}:{} on the host, not by the workspace owner",
        p.display(),
        md.uid(),
        md.gid()
    );
}

/// Every file and directory below `rel`, recursively, owned by root on the host.
fn assert_tree_owned_by_root(ws: &Workspace, rel: &str) {
    fn walk(p: &Path, out: &mut Vec<std::path::PathBuf>) {
        out.push(p.to_path_buf());
        if p.is_dir() && !p.is_symlink() {
            for e in std::fs::read_dir(p).expect("read_dir").flatten() {
                walk(&e.path(), out);
            }
        }
    }
    let mut all = Vec::new();
    walk(&ws.path().join(rel), &mut all);
    assert!(all.len() > 1, "{rel} has content");
    for p in all {
        let md = std::fs::symlink_metadata(&p).expect("metadata");
        assert_eq!(
            (md.uid(), md.gid()),
            (0, 0),
            "{} is not owned by root",
            p.display()
        );
    }
}

const PYTHON_WORK: &str = r#"
import multiprocessing
import os
import pty
import select
import subprocess
import sys
import threading


def square(x):
    return x * x


def read_all(fd):
    data = b""
    while True:
        r, _, _ = select.select([fd], [], [], 5)
        if not r:
            break
        try:
            chunk = os.read(fd, 1024)
        except OSError:  # EIO once the slave side is closed
            break
        if not chunk:
            break
        data += chunk
    return data


def main():
    # Threads.
    results = []
    lock = threading.Lock()

    def worker(i):
        with lock:
            results.append(i * i)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    print("threads", sum(results))

    # subprocess.
    r = subprocess.run(["sh", "-c", "echo sub-$((6*7))"], capture_output=True, text=True, check=True)
    print("subprocess", r.stdout.strip())

    # multiprocessing: a Pool of 2 worker processes (fork + semaphores in /dev/shm).
    with multiprocessing.Pool(2) as pool:
        print("pool", sum(pool.map(square, range(10))))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        print("spawn-pool", sum(pool.map(square, range(4))))

    # pty.openpty and os.openpty: what the slave side writes, the master side reads.
    for name, opener in (("pty.openpty", pty.openpty), ("os.openpty", os.openpty)):
        m, s = opener()
        os.write(s, b"through-the-pty\n")
        os.close(s)
        got = read_all(m)
        os.close(m)
        print(name, got.decode().strip())

    # pty.spawn: a child with the pty as its controlling terminal.
    captured = []

    def master_read(fd):
        data = os.read(fd, 1024)
        captured.append(data)
        return b""  # keep our stdout for the result lines only

    # master_read ends the copy loop after the first chunk, which closes the master; the child
    # ignores the resulting SIGHUP so that its exit status does not race with that close.
    status = pty.spawn(["/bin/sh", "-c", "trap '' HUP; test -t 0 && test -t 1 && echo spawned-on-a-tty"], master_read)
    print("pty.spawn", os.waitstatus_to_exitcode(status), b"".join(captured).decode().strip())

    # A fork with a new session on a pty (what terminals and `script` do).
    pid, fd = pty.fork()
    if pid == 0:
        os.execv("/bin/sh", ["sh", "-c", "tty >/dev/null && echo forked-tty-ok"])
    got = read_all(fd)
    _, st = os.waitpid(pid, 0)
    print("pty.fork", os.waitstatus_to_exitcode(st), got.decode().strip())

    with open("python-out.txt", "w") as f:
        f.write("done\n")
    print("python-done")


if __name__ == "__main__":
    main()
"#;

#[test]
fn python_threads_subprocess_multiprocessing_and_ptys() {
    let ws = Workspace::new();
    std::fs::write(ws.at("work.py"), PYTHON_WORK).expect("write work.py");
    let r = ws.run(STRICT, &[], &["python3", "work.py"]);
    let out = r.ok();
    let expect = [
        "threads 140",
        "subprocess sub-42",
        "pool 285",
        "spawn-pool 14",
        "pty.openpty through-the-pty",
        "os.openpty through-the-pty",
        "pty.spawn 0 spawned-on-a-tty",
        "pty.fork 0 forked-tty-ok",
        "python-done",
    ];
    let lines: Vec<&str> = out.lines().map(str::trim_end).collect();
    assert_eq!(lines, expect, "\n{}", r.describe());
    assert_owned_by_root(&ws, "python-out.txt");
}

#[test]
fn script_gives_a_controlling_terminal() {
    // util-linux script(1): openpty + setsid + TIOCSCTTY, all allowed.
    let ws = Workspace::new();
    let r = ws.run(
        STRICT,
        &[],
        &[
            "script",
            "-q",
            "-e",
            "-c",
            "test -t 1 && echo in-script",
            "script.log",
        ],
    );
    let out = r.ok();
    assert!(out.contains("in-script"), "{}", r.describe());
    let log = std::fs::read_to_string(ws.at("script.log")).expect("script.log");
    assert!(log.contains("in-script"), "{log}");
    assert_owned_by_root(&ws, "script.log");
}

const SQLITE_WORK: &str = r#"
import os
import sqlite3
import threading

db = "agent.db"
con = sqlite3.connect(db)
mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
print("journal_mode", mode)
con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
con.executemany("INSERT INTO t (v) VALUES (?)", [("row-%d" % i,) for i in range(100)])
con.commit()
print("wal-file", os.path.exists(db + "-wal"), os.path.exists(db + "-shm"))

# A second connection from another thread reads the committed rows while the first is open.
seen = []
def reader():
    c2 = sqlite3.connect(db)
    seen.append(c2.execute("SELECT count(*) FROM t").fetchone()[0])
    c2.close()
t = threading.Thread(target=reader)
t.start()
t.join()
print("reader", seen[0])

con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
print("integrity", con.execute("PRAGMA integrity_check").fetchone()[0])
con.close()
"#;

#[test]
fn sqlite_in_wal_mode() {
    let ws = Workspace::new();
    std::fs::write(ws.at("db.py"), SQLITE_WORK).expect("write db.py");
    let r = ws.run(STRICT, &[], &["python3", "db.py"]);
    let out = r.ok();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "journal_mode wal",
            "wal-file True True",
            "reader 100",
            "integrity ok"
        ],
        "\n{}",
        r.describe()
    );
    assert_owned_by_root(&ws, "agent.db");
    // The host can read what the agent wrote.
    let db = std::fs::read(ws.at("agent.db")).expect("read agent.db");
    assert!(db.starts_with(b"SQLite format 3\0"));
}

const GIT_WORK: &str = r#"
set -eu
git init -q repo
cd repo
echo "hello" > README
git add README
git -c user.name=Agent -c user.email=agent@example.invalid commit -q -m "first commit"
echo "more" >> README
git -c user.name=Agent -c user.email=agent@example.invalid commit -q -a -m "second commit"
git log --format=%s
git status --porcelain | wc -l
"#;

#[test]
fn git_init_add_commit() {
    let ws = Workspace::new();
    let r = ws.run(STRICT, &[], &["sh", "-c", GIT_WORK]);
    let out = r.ok();
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert_eq!(
        lines,
        ["second commit", "first commit", "0"],
        "\n{}",
        r.describe()
    );
    assert_tree_owned_by_root(&ws, "repo");
    // The host's git agrees (the objects are real).
    let log = std::process::Command::new("git")
        .args(["-c", "safe.directory=*", "-C"])
        .arg(ws.path().join("repo"))
        .args(["rev-list", "--count", "HEAD"])
        .output()
        .expect("host git");
    assert_eq!(String::from_utf8_lossy(&log.stdout).trim(), "2");
}

const C_SOURCE: &str = r#"
#include <pthread.h>
#include <stdio.h>

static void *work(void *arg) { *(int *)arg *= 2; return NULL; }

int main(void) {
    int v = 21;
    pthread_t t;
    if (pthread_create(&t, NULL, work, &v) != 0) return 1;
    pthread_join(t, NULL);
    printf("hello from c %d\n", v);
    return 0;
}
"#;

const MAKEFILE: &str = "\
CFLAGS = -O2 -Wall -pthread

all: hello-make
\t./hello-make > make-out.txt

hello-make: hello.o
\t$(CC) $(CFLAGS) -o $@ $^

hello.o: hello.c
\t$(CC) $(CFLAGS) -c -o $@ $<

.PHONY: all
";

#[test]
fn gcc_compiles_and_runs() {
    let ws = Workspace::new();
    std::fs::write(ws.at("hello.c"), C_SOURCE).expect("write hello.c");
    let r = ws.run(
        STRICT,
        &[],
        &[
            "sh",
            "-c",
            "gcc -O2 -Wall -pthread -o hello hello.c && ./hello",
        ],
    );
    assert_eq!(r.ok().trim(), "hello from c 42", "{}", r.describe());
    assert_owned_by_root(&ws, "hello");
    // The host can run the agent's binary too.
    let host = std::process::Command::new(ws.at("hello"))
        .output()
        .expect("run hello on the host");
    assert_eq!(
        String::from_utf8_lossy(&host.stdout).trim(),
        "hello from c 42"
    );
}

#[test]
fn make_builds_with_a_makefile() {
    let ws = Workspace::new();
    std::fs::write(ws.at("hello.c"), C_SOURCE).expect("write hello.c");
    std::fs::write(ws.at("Makefile"), MAKEFILE).expect("write Makefile");
    let r = ws.run(STRICT, &[], &["make", "-j2"]);
    r.ok();
    let out = std::fs::read_to_string(ws.at("make-out.txt")).expect("make-out.txt");
    assert_eq!(out.trim(), "hello from c 42");
    for f in ["hello.o", "hello-make", "make-out.txt"] {
        assert_owned_by_root(&ws, f);
    }
    // Nothing left to do the second time.
    let r = ws.run(STRICT, &[], &["make", "-q", "hello-make"]);
    assert_eq!(r.code(), 0, "{}", r.describe());
}

#[test]
fn writing_to_dev_stdout_and_dev_stderr() {
    let ws = Workspace::new();
    let r = ws.run(
        STRICT,
        &[],
        &[
            "sh",
            "-c",
            "echo to-stdout > /dev/stdout && echo to-stderr > /dev/stderr",
        ],
    );
    assert_eq!(r.ok().trim(), "to-stdout", "{}", r.describe());
    assert_eq!(r.stderr.trim(), "to-stderr", "{}", r.describe());
}

/// Naming a thread through /proc (what pthread_setname_np does for another thread) opens the
/// comm file with O_TRUNC: Landlock must grant Truncate there, not only WriteFile.
#[test]
fn a_process_can_rename_itself_through_proc() {
    let ws = Workspace::new();
    let r = ws.run(
        STRICT,
        &[],
        &[
            "sh",
            "-c",
            "echo renamed > /proc/$$/comm && cat /proc/$$/comm",
        ],
    );
    assert_eq!(r.ok().trim(), "renamed", "{}", r.describe());
}
