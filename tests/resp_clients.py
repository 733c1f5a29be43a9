#!/usr/bin/env python3
"""Drives causalkv's RESP listener with redis-py, a Redis client we did not write.

tests/client.rs runs it against a test cluster: `python3 tests/resp_clients.py SCENARIO
--certs DIR --port PORT [...]`. Each scenario asserts what it sees and prints `ok SCENARIO`
last; any failure exits non-zero with the assertion's message.

Scenarios:
  wait       SET, then WAIT --replicas N --timeout-ms T must return --expect.
  wait-cut   SET, WAIT 1 (the reachable peer acks), then WAIT 2 --timeout-ms T must return 1.
  chain      a causal chain across three sites (--ports A,B,C): a writes x_i; a session at b
             reads x_i, then writes y_i; fresh sessions at c read y_i, then x_i, until both are there. Prints every
             operation as a JSON line for the causal checker (tests/client.rs).
  misc       pipelining, refused options, oversized arguments, garbage bytes and the connection
             limit; the site keeps serving after each (--max-pipeline, --max-value,
             --max-arg-bytes, --max-connections: the site's limits).
"""

import argparse
import json
import socket
import ssl
import sys
import time

import redis


def client(args, **kw):
    return redis.Redis(
        host="127.0.0.1",
        port=args.port,
        ssl=True,
        ssl_ca_certs=f"{args.certs}/ca.pem",
        ssl_certfile=f"{args.certs}/client-cli.pem",
        ssl_keyfile=f"{args.certs}/client-cli.key",
        socket_timeout=30,
        **kw,
    )


def raw(args):
    """A bare TLS socket with the client certificate, for bytes no client library sends."""
    ctx = ssl.create_default_context(cafile=f"{args.certs}/ca.pem")
    ctx.load_cert_chain(f"{args.certs}/client-cli.pem", f"{args.certs}/client-cli.key")
    sock = socket.create_connection(("127.0.0.1", args.port), timeout=30)
    return ctx.wrap_socket(sock, server_hostname="localhost")


def read_all(sock):
    """Everything the server sends until it closes the connection."""
    out = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return out
        out += chunk


def expect_error(fn, needle):
    try:
        got = fn()
    except redis.ResponseError as e:
        assert needle in str(e), f"error {e!r} does not mention {needle!r}"
        return str(e)
    raise AssertionError(f"expected an error mentioning {needle!r}, got {got!r}")


def still_serving(args):
    r = client(args)
    assert r.ping() is True
    r.set("alive", "yes")
    assert r.get("alive") == b"yes"
    r.close()


def wait(args):
    r = client(args, protocol=args.protocol)
    assert r.set("wait-key", "v") is True
    got = r.execute_command("WAIT", args.replicas, args.timeout_ms)
    assert got == args.expect, f"WAIT {args.replicas} {args.timeout_ms} returned {got}, expected {args.expect}"


def wait_cut(args):
    r = client(args)
    assert r.set("wait-cut-key", "v") is True
    got = r.execute_command("WAIT", 1, 30000)
    assert got == 1, f"WAIT 1 returned {got}: the reachable peer should ack"
    got = r.execute_command("WAIT", 2, args.timeout_ms)
    assert got == 1, f"WAIT 2 {args.timeout_ms} returned {got} with one peer cut off, expected 1"


def misc(args):
    # RESP3 and RESP2 both work; HELLO reports the protocol.
    r3 = client(args, protocol=3)
    assert r3.set("p3", "three") is True and r3.get("p3") == b"three"
    hello = r3.execute_command("HELLO", 3)
    assert hello[b"proto" if b"proto" in hello else "proto"] == 3, hello
    r3.close()

    r = client(args)
    # Pipelining: writes then reads, in order, read-your-writes within the pipeline.
    p = r.pipeline(transaction=False)
    for i in range(10):
        p.set(f"pk{i}", f"pv{i}")
        p.get(f"pk{i}")
    p.mset({"ma": "1", "mb": "2"})
    p.mget("ma", "mb", "nope")
    p.delete("ma", "mb", "nope")
    p.exists("ma", "pk0")
    out = p.execute()
    for i in range(10):
        assert out[2 * i] is True and out[2 * i + 1] == f"pv{i}".encode(), out
    assert out[20:] == [True, [b"1", b"2", None], 2, 1], out[20:]

    # A pipeline deeper than resp.max_pipeline in one write: the excess is refused, in order.
    deep = args.max_pipeline * 2
    p = r.pipeline(transaction=False)
    for i in range(deep):
        p.set(f"deep{i}", "x")
    out = p.execute(raise_on_error=False)
    errors = [o for o in out if isinstance(o, redis.ResponseError)]
    assert errors, "a pipeline deeper than resp.max_pipeline got no error"
    assert all("resp.max_pipeline" in str(e) for e in errors), errors[0]
    assert out[0] is True, out[0]
    assert r.ping() is True

    # Options causalkv does not support get a clear error; the connection stays usable.
    expect_error(lambda: r.set("k", "v", ex=10), "do not expire")
    expect_error(lambda: r.set("k", "v", px=10), "do not expire")
    expect_error(lambda: r.set("k", "v", get=True), "SET GET")
    expect_error(lambda: r.execute_command("SET", "k", "v", "BOGUS"), "syntax error")
    expect_error(lambda: r.execute_command("SELECT", 1), "out of range")
    expect_error(lambda: r.execute_command("FLUSHALL"), "unknown command")
    expect_error(lambda: r.execute_command("CAUSAL.TOKEN", "nope"), "not a session token")
    assert r.get("k") is None

    # Found in review: a token whose 64th byte fell inside a character panicked the
    # connection's task (its error message cut the token by bytes); HELLO's SETNAME skipped
    # the name check. Both are clear errors now, on a connection that stays usable.
    expect_error(lambda: r.execute_command("CAUSAL.TOKEN", "a" * 63 + "é"), "not a session token")
    expect_error(lambda: r.execute_command("HELLO", 2, "SETNAME", "a b\nid=1"), "cannot contain spaces")
    assert r.ping() is True

    # A reply past resp.max_reply_bytes (an MGET of one large value named many times): an
    # error, and the connection stays usable; one under it arrives whole.
    big = b"v" * args.max_value
    r.set("mget-big", big)
    over = args.max_reply_bytes // args.max_value + 1
    expect_error(lambda: r.mget(["mget-big"] * over), "resp.max_reply_bytes")
    under = max(1, (args.max_reply_bytes // 2) // (args.max_value + 16))
    assert r.mget(["mget-big"] * under) == [big] * under
    assert r.ping() is True

    # Found in review: every read checked a partial request again from its start. A request of
    # 10,000 arguments in 3-byte reads is answered, and the site serves others meanwhile.
    s = raw(args)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    keys = 10000
    req = b"*%d\r\n$6\r\nEXISTS\r\n" % (keys + 1) + b"$5\r\npk1xx\r\n" * keys
    for i in range(0, len(req), 3):
        s.sendall(req[i:i + 3])
        if i == len(req) // 2:
            still_serving(args)
    s.sendall(b"QUIT\r\n")
    reply = read_all(s)
    assert reply.startswith(b":0\r\n+OK"), reply[:80]

    # A value over limits.max_value (but under resp.max_arg_bytes): refused, connection usable.
    expect_error(lambda: r.set("big", b"x" * (args.max_value + 1)), "limits.max_value")
    assert r.ping() is True
    # An argument over resp.max_arg_bytes: a protocol error, and the connection is closed.
    s = raw(args)
    s.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\n" % (args.max_arg_bytes + 1))
    reply = read_all(s)
    assert b"resp.max_arg_bytes" in reply, reply
    still_serving(args)
    # Through redis-py too: the error reaches the caller.
    try:
        client(args).set("huge", b"y" * (args.max_arg_bytes + 1))
        raise AssertionError("an argument over resp.max_arg_bytes was accepted")
    except (redis.ResponseError, redis.ConnectionError) as e:
        print(f"oversized argument through redis-py: {e!r}")
    still_serving(args)

    # Garbage bytes: an unknown inline command is an error; a malformed header closes.
    s = raw(args)
    s.sendall(b"\x00\xff\xfegarbage here\r\nPING\r\n*x\r\n")
    reply = read_all(s)
    assert reply.startswith(b"-ERR unknown command"), reply
    assert b"+PONG\r\n" in reply, reply
    assert b"Protocol error: invalid multibulk length" in reply, reply
    still_serving(args)
    s = raw(args)
    s.sendall(bytes(range(256)) * 4 + b"\r\nQUIT\r\n")
    reply = read_all(s)
    assert reply.startswith(b"-"), reply
    still_serving(args)

    # The connection limit: the connection past it is told so; the others keep working.
    r.close()
    first = client(args, single_connection_client=True)
    for _ in range(400):
        # Wait until the site has noticed every earlier connection close.
        if first.info("clients")["connected_clients"] == 1:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"connections linger: {first.info('clients')}")
    held = [first] + [client(args, single_connection_client=True) for _ in range(args.max_connections - 1)]
    for h in held:
        assert h.ping() is True
    try:
        # single_connection_client connects (and says HELLO or PING) at construction.
        client(args, single_connection_client=True).ping()
        raise AssertionError("a connection past resp.max_connections was served")
    except (redis.ConnectionError, redis.ResponseError) as e:
        assert "max number of clients" in str(e), repr(e)
    assert held[0].get("pk1") == b"pv1"
    for h in held:
        h.close()
    still_serving_eventually(args)


def still_serving_eventually(args):
    """After connections close, their slots come back (the server notices the close)."""
    last = None
    for _ in range(200):
        try:
            still_serving(args)
            return
        except (redis.ConnectionError, redis.ResponseError) as e:
            last = e
            time.sleep(0.05)
    raise AssertionError(f"the site does not serve new connections after others closed: {last!r}")


def chain(args):
    ports = [int(p) for p in args.ports.split(",")]
    sessions = [0]

    def session(site):
        args.port = ports[site]
        sessions[0] += 1
        return sessions[0], site, client(args, single_connection_client=True)

    def log(sid, site, op, key, value):
        print(json.dumps({"s": sid, "site": site, "op": op, "k": key, "v": value}), flush=True)

    def get(sess, key):
        sid, site, r = sess
        v = r.get(key)
        v = None if v is None else v.decode()
        log(sid, site, "r", key, v)
        return v

    def put(sess, key, value):
        sid, site, r = sess
        assert r.set(key, value) is True
        log(sid, site, "w", key, value)

    writer, relayer = session(0), session(1)
    for i in range(args.rounds):
        put(writer, f"x{i}", f"a{i}")
        for _ in range(2000):
            if get(relayer, f"x{i}") is not None:
                break
            time.sleep(0.005)
        else:
            raise AssertionError(f"b never saw x{i}")
        put(relayer, f"y{i}", f"b{i}")
        # Fresh sessions at c: whenever one sees y_i, it must see x_i (its cause).
        for _ in range(2000):
            probe = session(2)
            y = get(probe, f"y{i}")
            x = get(probe, f"x{i}")
            probe[2].close()
            if x is not None and y is not None:
                break


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=["wait", "wait-cut", "misc", "chain"])
    ap.add_argument("--ports", default="")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--certs", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--protocol", type=int, default=2)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--timeout-ms", type=int, default=5000)
    ap.add_argument("--expect", type=int, default=2)
    ap.add_argument("--max-pipeline", type=int, default=1024)
    ap.add_argument("--max-value", type=int, default=1 << 20)
    ap.add_argument("--max-arg-bytes", type=int, default=2 << 20)
    ap.add_argument("--max-connections", type=int, default=1024)
    ap.add_argument("--max-reply-bytes", type=int, default=16 << 20)
    args = ap.parse_args()
    {"wait": wait, "wait-cut": wait_cut, "misc": misc, "chain": chain}[args.scenario](args)
    print(f"ok {args.scenario}")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
