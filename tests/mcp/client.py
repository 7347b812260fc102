#!/usr/bin/env python3
"""Drives `aitherctl mcp` over stdio with the official MCP Python client (the `mcp` package).

Run by tests/mcp.rs against a real aitherd (AITHER_SOCKET and friends in the environment):

    client.py AITHERCTL WORKSPACE AGENT TOKEN_FILE TOKEN_AGENT

Every check is an assertion with its message; the exit status is 0 only when all passed.
A missing `mcp` package is a failure (exit 3), never a skip.
"""

import json
import os
import subprocess
import sys

try:
    import anyio
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client
except ImportError as e:  # the test must fail, not skip, where CI lacks the client
    print(f"the MCP Python client is missing ({e}): run install.sh, or pip install mcp", file=sys.stderr)
    sys.exit(3)

TOOLS = {"run", "spawn", "ps", "logs", "exec", "stop", "rm", "read", "write", "list",
         "mem_get", "mem_put", "mem_search", "bus_publish"}


def is_error(r):
    return getattr(r, "is_error", None) if hasattr(r, "is_error") else r.isError


def structured(r):
    return getattr(r, "structured_content", None) if hasattr(r, "structured_content") else r.structuredContent


def text(r):
    return "".join(c.text for c in r.content if getattr(c, "type", "") == "text")


async def call(s, tool, **args):
    r = await s.call_tool(tool, args)
    print(f"{tool} {json.dumps(args)} -> error={is_error(r)} {text(r)[:300]!r}", flush=True)
    return r


async def ok(s, tool, **args):
    r = await call(s, tool, **args)
    assert not is_error(r), f"{tool} failed: {text(r)}"
    return structured(r)


async def refused(s, tool, field, **args):
    r = await call(s, tool, **args)
    assert is_error(r), f"{tool} {args} should have failed: {text(r)}"
    assert f"`{field}`" in text(r) or f"{field}:" in text(r), f"{tool}: the error should name `{field}`: {text(r)}"
    return text(r)


def server(aitherctl, *args):
    return StdioServerParameters(command=aitherctl, args=["mcp", *args], env=dict(os.environ))


async def session(params, body):
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as s:
            init = await s.initialize()
            version = getattr(init, "protocol_version", None) or getattr(init, "protocolVersion", None)
            assert version, "initialize gave no protocol version"
            await s.send_ping()
            await body(s)


async def wait_for_log(s, agent, want):
    # Polls the agent's log (each call a round trip to aitherd); no sleep, no timing assertion:
    # the bound is on the number of polls.
    for _ in range(2000):
        got = await ok(s, "logs", agent=agent)
        if want in got["text"]:
            return
        await anyio.sleep(0.05)
    raise AssertionError(f"{agent} never logged {want!r}")


async def operator(s, ws, agent):
    listed = await s.list_tools()
    names = {t.name for t in listed.tools}
    assert names == TOOLS, f"tools: {sorted(names)}"
    for t in listed.tools:
        schema = getattr(t, "input_schema", None) or getattr(t, "inputSchema", None)
        assert schema["type"] == "object", f"{t.name}: {schema}"

    # run: a sandboxed one-off command.
    r = await ok(s, "run", argv=["echo", "hi"], policy="strict")
    assert r["exit_code"] == 0 and r["stdout"] == "hi\n", r
    r = await ok(s, "run", argv=["cat", "/etc/shadow"], policy="strict")
    assert r["exit_code"] != 0, f"/etc/shadow was readable in strict: {r}"
    assert "root:" not in r["stdout"], r
    assert "/etc/shadow" in r["stderr"], r

    # spawn, logs, ps.
    r = await ok(s, "spawn", agent=agent, workspace=ws, policy="strict",
                 argv=["sh", "-c", "echo started; exec sleep 300"])
    assert r["name"] == agent, r
    await wait_for_log(s, agent, "started")
    r = await ok(s, "ps")
    assert agent in [a["name"] for a in r["agents"]], r

    # memory.
    await ok(s, "mem_put", agent=agent, tier="knowledge", key="goal", value={"text": "find the unicorn"})
    r = await ok(s, "mem_get", agent=agent, tier="knowledge", key="goal")
    assert json.dumps(r).count("find the unicorn") == 1, r
    r = await ok(s, "mem_search", agent=agent, query="unicorn")
    assert "goal" in json.dumps(r), r

    # files in its workspace, as the agent.
    note = f"{ws}/note.txt"
    await ok(s, "write", agent=agent, path=note, content="hello from mcp\n")
    r = await ok(s, "read", agent=agent, path=note)
    assert r["content"] == "hello from mcp\n", r
    r = await ok(s, "list", agent=agent, path=ws)
    kinds = {e["name"]: e for e in r["entries"]}
    assert kinds["note.txt"]["kind"] == "file", r
    assert kinds["escape"]["kind"] == "symlink" and kinds["escape"]["target"] == "/etc/hostname", r
    t = await refused(s, "read", "path", agent=agent, path=f"{ws}/escape")
    assert "symbolic link" in t, t
    t = await refused(s, "read", "path", agent=agent, path=ws)
    assert "is a dir in the agent" in t, t
    r = await ok(s, "exec", agent=agent, argv=["cat", note])
    assert r["exit_code"] == 0 and r["stdout"] == "hello from mcp\n", r

    # bus.
    r = await ok(s, "bus_publish", subject=f"agent.{agent}.inbox", data={"hello": 1}, durable=True)
    assert r["reply"]["seq"] >= 1, r

    # clear errors.
    await refused(s, "logs", "agent")
    await refused(s, "logs", "agnet", agnet=agent)
    await refused(s, "run", "argv", argv="echo hi")


async def narrowed(s, other, subject, ws):
    # Outside the token: another agent, another policy, a subject not granted.
    t = await refused(s, "logs", "agent", agent=other)
    assert "refused by the token" in t, t
    await refused(s, "stop", "agent", agent=other)
    await refused(s, "read", "agent", agent=other, path=f"{ws}/note.txt")
    await refused(s, "spawn", "agent", agent=other, argv=["true"], workspace=ws)
    await refused(s, "run", "policy", argv=["true"], policy="permissive")
    await refused(s, "bus_publish", "subject", subject=f"agent.{other}.inbox", data=1)
    await refused(s, "mem_get", "agent", agent=other, tier="knowledge", key="goal")
    # Inside it: a run and its own agent, with the token as the sandbox.
    r = await ok(s, "run", argv=["echo", "within"])
    assert r["exit_code"] == 0 and r["stdout"] == "within\n", r
    r = await ok(s, "spawn", agent=subject, workspace=ws, argv=["sh", "-c", "echo mine; exec sleep 300"])
    assert r["name"] == subject, r
    await wait_for_log(s, subject, "mine")
    r = await ok(s, "ps")
    assert [a["name"] for a in r["agents"]] == [subject], r
    await ok(s, "bus_publish", subject=f"agent.{subject}.out", data={"n": 1})
    await ok(s, "stop", agent=subject, timeout_s=1)
    await ok(s, "rm", agent=subject)


async def revoked(s, aitherctl, token_file):
    # The token is verified before every call: revoked while the server runs, it refuses.
    await ok(s, "ps")
    tid = json.loads(subprocess.run([aitherctl, "token", "inspect", token_file, "--json"],
                                    capture_output=True, check=True).stdout)["id"]
    subprocess.run([aitherctl, "token", "revoke", tid, "--reason", "mcp test"], check=True)
    t = await refused(s, "ps", "token")
    assert "revoked" in t, t


async def main():
    aitherctl, ws, agent, token_file, subject = sys.argv[1:6]
    await session(server(aitherctl), lambda s: operator(s, ws, agent))
    await session(server(aitherctl, "--token", token_file), lambda s: narrowed(s, agent, subject, ws))
    await session(server(aitherctl, "--token", token_file), lambda s: revoked(s, aitherctl, token_file))
    print("mcp client: all checks passed", flush=True)


if __name__ == "__main__":
    anyio.run(main)
