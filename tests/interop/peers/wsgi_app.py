"""A legacy WSGI app for gunicorn: a list of items in PostgreSQL (psycopg2), one
connection per request, as many old apps do. DATABASE_URL names the database.

  GET    /items       -> 200 {"items": [{"id", "name"}, ...]}
  POST   /items       -> 201 {"id", "name"}   (body: {"name": ...})
  DELETE /items/<id>  -> 204, or 404
  a database it cannot reach -> 503 {"detail": "database unavailable"}
"""

import json
import os

import psycopg2

DSN = os.environ["DATABASE_URL"]


def _respond(start_response, status, obj=None):
    reasons = {200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request",
               404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
    body = b"" if obj is None else json.dumps(obj).encode()
    headers = [("Content-Length", str(len(body)))]
    if obj is not None:
        headers.append(("Content-Type", "application/json"))
    start_response(f"{status} {reasons[status]}", headers)
    return [body]


def _handle(conn, method, path, environ):
    with conn.cursor() as cur:
        if path == "/items" and method == "GET":
            cur.execute("SELECT id, name FROM items ORDER BY id")
            return 200, {"items": [{"id": i, "name": n} for i, n in cur.fetchall()]}
        if path == "/items" and method == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            try:
                name = json.loads(environ["wsgi.input"].read(length))["name"]
            except (ValueError, KeyError, TypeError):
                return 400, {"detail": "expected {\"name\": ...}"}
            cur.execute("INSERT INTO items (name) VALUES (%s) RETURNING id", (name,))
            return 201, {"id": cur.fetchone()[0], "name": name}
        if path.startswith("/items/") and method == "DELETE":
            cur.execute("DELETE FROM items WHERE id = %s", (int(path.rsplit("/", 1)[1]),))
            return (204, None) if cur.rowcount else (404, {"detail": "no such item"})
    return 404 if not path.startswith("/items") else 405, {"detail": "not here"}


def app(environ, start_response):
    try:
        conn = psycopg2.connect(DSN, connect_timeout=2)
    except psycopg2.OperationalError:
        return _respond(start_response, 503, {"detail": "database unavailable"})
    try:
        with conn:
            status, obj = _handle(conn, environ["REQUEST_METHOD"], environ["PATH_INFO"], environ)
    finally:
        conn.close()
    return _respond(start_response, status, obj)
