"""A legacy app behind opsgate: a WSGI app under gunicorn (sync workers) keeping its data
in a throwaway PostgreSQL through psycopg2, with opsgate's postgres check on the same
database. Reads and writes pass, maintenance blocks writes only (they never reach the
app), and readiness follows the database down and back up."""

import json

import psycopg2
import pytest

from conftest import PEERS, PYTHON, clean_env, curl_status, http, http_json, listening_socket, wait_until

CONFIG = """
[upstreams.app]
url = "http://127.0.0.1:{app_port}"
connect_timeout = "1s"
timeout = "10s"

[[routes]]
name = "app"
prefix = "/"
upstream = "app"

[maintenance]
mode = "writes"
retry_after = "120s"

[[health.checks]]
name = "database"
type = "postgres"
url = "{db_url}"
critical = true
interval = "200ms"
timeout = "1s"
"""


@pytest.fixture
def legacy(procs, postgres, opsgate):
    with psycopg2.connect(postgres.url) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL)")
    conn.close()
    sock = listening_socket()
    port = sock.getsockname()[1]
    procs.start(
        "gunicorn",
        [PYTHON, "-m", "gunicorn", "--bind", f"fd://{sock.fileno()}", "--workers", "2",
         "--graceful-timeout", "1", "wsgi_app:app"],
        pass_fds=(sock.fileno(),), cwd=PEERS, env=clean_env({"DATABASE_URL": postgres.url}),
    )
    sock.close()
    direct = f"http://127.0.0.1:{port}"
    wait_until(lambda: http("GET", f"{direct}/items", timeout=2)[0] == 200, "gunicorn to serve")
    og = opsgate(CONFIG.format(app_port=port, db_url=postgres.url))
    return direct, og, postgres


def rows(pg):
    with psycopg2.connect(pg.url) as conn, conn.cursor() as cur:
        cur.execute("SELECT name FROM items ORDER BY id")
        names = [r[0] for r in cur.fetchall()]
    conn.close()
    return names


def post_item(base, name):
    return http_json("POST", f"{base}/items", json.dumps({"name": name}), {"content-type": "application/json"})


def test_reads_and_writes_pass(legacy):
    direct, og, pg = legacy
    for label, base in (("direct", direct), ("opsgate", og.url("").rstrip("/"))):
        status, body = post_item(base, f"from {label}")
        assert status == 201, (label, body)
        status, body = http_json("GET", f"{base}/items")
        assert status == 200, (label, body)
        assert body["items"][-1]["name"] == f"from {label}", label
        status, _, _ = http("DELETE", f"{base}/items/{body['items'][-1]['id']}")
        assert status == 204, label
    assert rows(pg) == []


def test_http2_client_write_reaches_the_wsgi_app(legacy):
    """An HTTP/2 client's POST, sent on over HTTP/1.1: the WSGI app reads the body by its
    Content-Length, as legacy apps do."""
    _, og, pg = legacy
    status, version, body = curl_status(
        "--http2-prior-knowledge", "-H", "content-type: application/json",
        "--data-binary", json.dumps({"name": "over h2"}), og.url("/items"))
    assert (status, version) == (201, "2"), body
    assert rows(pg) == ["over h2"]


def test_maintenance_blocks_writes_only(legacy):
    _, og, pg = legacy
    base = og.url("").rstrip("/")
    assert post_item(base, "before")[0] == 201

    status, body = og.admin("PUT", "/_ops/maintenance", {"enabled": True, "reason": "db migration"})
    assert status == 200 and body["enabled"] is True, body

    status, body = http_json("GET", f"{base}/items")
    assert status == 200, body
    assert [i["name"] for i in body["items"]] == ["before"]
    item_id = body["items"][0]["id"]

    for method, path, data in (("POST", "/items", json.dumps({"name": "during"})),
                               ("DELETE", f"/items/{item_id}", None)):
        status, headers, raw = http(method, f"{base}{path}", data, {"content-type": "application/json"})
        assert status == 503, (method, status, raw)
        assert json.loads(raw) == {"detail": "maintenance"}, raw
        assert headers["Retry-After"] == "120", dict(headers)
    assert rows(pg) == ["before"], "a blocked write reached the app"
    # Health endpoints stay exempt.
    assert http("GET", og.url("/_health/ready"))[0] == 200

    status, body = og.admin("PUT", "/_ops/maintenance", {"enabled": None})
    assert status == 200 and body["enabled"] is False, body
    assert post_item(base, "after")[0] == 201
    assert rows(pg) == ["before", "after"]


def test_readiness_follows_the_database(legacy):
    _, og, pg = legacy
    ready = og.url("/_health/ready")

    def ready_status():
        return http_json("GET", ready)

    wait_until(lambda: ready_status()[0] == 200, "readiness 200 with the database up")

    pg.kill()
    status, body = wait_until(lambda: (lambda r: r if r[0] == 503 else None)(ready_status()),
                              "readiness 503 with the database down")
    assert body["status"] == "unhealthy", body
    check = next(c for c in body["checks"] if c["name"] == "database")
    assert check["status"] == "unhealthy" and check.get("message"), check
    # The app itself answers its own 503 meanwhile (opsgate passes it on).
    assert http("GET", og.url("/items"))[0] == 503
    assert http("GET", og.url("/_health/live"))[0] == 200

    pg.start()
    wait_until(lambda: ready_status()[0] == 200, "readiness 200 with the database back", limit=15)
    assert http("GET", og.url("/items"))[0] == 200
