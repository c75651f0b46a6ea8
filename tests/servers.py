"""Servers the remote tests start on loopback: HTTP with injectable faults, and S3 (moto).

`FaultyHTTPServer` serves a folder with Range support (for resumed downloads) and, per file name,
a fault: "missing" (404), "truncate" (the full Content-Length announced, half the body sent, then
the connection closed), "corrupt" (one byte flipped, right length), "cut-once" (the first GET of
the file breaks off mid-body, later ones succeed: a retry must recover), "redirect" (a GET of the
file is answered 302, to the same path with a query, which serves it), "redirect-loop" (every GET of the file is
answered 302 to itself, as a misconfigured server does), "no-range" (a Range request is
answered 200 with the whole file, as by a server without range support), "busy-once" (the first GET of the
file is answered 503 Service Unavailable, later ones served), "stall" (half the body sent, `stalled` set, then
nothing more till the server closes: a link gone quiet). It answers as a proxy too:
a request for an absolute URL (`http_proxy` set to the server's URL) is served that URL's path.
With `auth="user:password"` every request without that basic auth is answered 401, with
`query="sig=..."` (a signed URL's token) every request without that query string 403. `requests` counts GETs,
`starts` lists each GET's (name, first byte). `down_for(seconds)` refuses connections a while (a restart).
With `tls=True` it answers HTTPS only, with a self-signed certificate no client trusts.
"""
import base64
import http.server
import json
import os
import socket
import sys
import threading
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

FAULTS = ("missing", "truncate", "corrupt", "cut-once", "redirect", "redirect-loop", "no-range", "busy-once", "stall")


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _target(self):
        name = urllib.parse.urlsplit(self.path).path.lstrip("/")
        path = Path(self.server.root) / name
        fault = self.server.faults.get(name)
        if self.server.auth and self.headers.get("Authorization") != self.server.auth:
            self.send_error(401)
            return None, None, None
        if self.server.query and urllib.parse.urlsplit(self.path).query != self.server.query:
            self.send_error(403)
            return None, None, None
        if fault == "missing" or not path.is_file():
            self.send_error(404)
            return None, None, None
        return name, path, fault

    def _range(self, size):
        spec = self.headers.get("Range")
        if not spec or not spec.startswith("bytes="):
            return 0, size
        first, _, last = spec[6:].partition("-")
        return int(first), (int(last) + 1 if last else size)

    def do_HEAD(self):
        name, path, _ = self._target()
        if name is None:
            return
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self):
        name, path, fault = self._target()
        if name is None:
            return
        if fault == "redirect-loop" or (fault == "redirect" and "?" not in self.path):
            self.send_response(302)
            self.send_header("Location", self.path if fault == "redirect-loop" else f"{self.path}?moved")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.server.requests[name] += 1
        if fault == "busy-once" and self.server.requests[name] == 1:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        size = path.stat().st_size
        lo, hi = (0, size) if fault == "no-range" else self._range(size)
        self.server.starts.append((name, lo))
        self.send_response(206 if (lo, hi) != (0, size) else 200)
        if (lo, hi) != (0, size):
            self.send_header("Content-Range", f"bytes {lo}-{hi - 1}/{size}")
        self.send_header("Content-Length", str(hi - lo))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        with open(path, "rb") as f:
            f.seek(lo)
            data = f.read(hi - lo)
        if fault == "corrupt":
            data = bytearray(data)
            data[len(data) // 2] ^= 0xFF
        if fault == "stall":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.server.stalled.set()
            self.server.released.wait(60)
            return
        if fault == "truncate" or (fault == "cut-once" and self.server.requests[name] == 1):
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # the client sees the body end early
            return
        self.wfile.write(data)


class FaultyHTTPServer(http.server.ThreadingHTTPServer):
    """Serve `root` on 127.0.0.1 (a free port) in a daemon thread; `faults` maps file name -> fault."""

    daemon_threads = True

    def __init__(self, root, faults=None, auth=None, query=None, tls=False):
        super().__init__(("127.0.0.1", 0), _Handler)
        if tls:
            from werkzeug.serving import generate_adhoc_ssl_context  # moto[server]'s, in the test extra

            self.socket = generate_adhoc_ssl_context().wrap_socket(self.socket, server_side=True)
        self.root, self.faults, self.requests, self.starts = str(root), dict(faults or {}), Counter(), []
        self.auth, self.query = auth and f"Basic {base64.b64encode(auth.encode()).decode()}", query
        self.stalled, self.released = threading.Event(), threading.Event()
        assert set(self.faults.values()) <= set(FAULTS), self.faults
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def handle_error(self, request, client_address):
        # A client that hangs up mid-body (a reader stopping at a fault, a cancelled prefetch) is
        # expected here, not worth a traceback in the test output; anything else is printed.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def down_for(self, seconds):
        """Stop listening now (connections are refused) and listen again on the same port after `seconds`:
        a server's restart, a load balancer's blip, as a client sees it."""
        self.shutdown()
        self.socket.close()

        def back():
            self.socket = socket.socket(self.address_family, self.socket_type)
            self.server_bind()  # the same port: `server_address` holds the one bound first
            self.server_activate()
            threading.Thread(target=self.serve_forever, daemon=True).start()
        self._back = threading.Timer(seconds, back)
        self._back.start()

    def close(self):
        self.released.set()  # a "stall" answer ends
        if getattr(self, "_back", None):
            self._back.cancel()
            self._back.join()
        self.shutdown()
        self.server_close()


class S3Server:
    """A moto S3 server on loopback, read through the real boto3/s3fs clients.

    It sets AWS_ENDPOINT_URL (and dummy credentials) in os.environ while open, so `s3://` URLs work
    with no storage_options, in this process and in subprocesses (torchrun) alike.
    """

    ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self._saved = {k: os.environ.get(k) for k in (*self.ENV, "AWS_ENDPOINT_URL")}
        os.environ.update(self.ENV, AWS_ENDPOINT_URL=self.endpoint)

    def upload(self, folder, bucket, prefix):
        """Copy every file of `folder` to s3://bucket/prefix/; returns that URL."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint)
        client.create_bucket(Bucket=bucket)
        for path in sorted(Path(folder).iterdir()):
            if path.is_file():
                client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
        return f"s3://{bucket}/{prefix}"

    def deny_reads(self, bucket, allowed=()):
        """Turn on moto's access checks and make a user that may list `bucket` and get only the keys in
        `allowed`: any other GET is refused (403 AccessDenied, which s3fs raises as PermissionError), as
        a bucket without the reader's grant is. `s3://` URLs sign as that user from then on (os.environ)."""
        import boto3
        import s3fs

        iam = boto3.client("iam", endpoint_url=self.endpoint)
        user = f"reader-{bucket}"  # moto keeps users per process, as it keeps buckets
        statements = [{"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{bucket}"}]
        if allowed:
            statements.append({"Effect": "Allow", "Action": "s3:GetObject",
                               "Resource": [f"arn:aws:s3:::{bucket}/{key}" for key in allowed]})
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName="read", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": statements}))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        self._set_auth("0")  # every request from now on is checked
        os.environ.update(AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"])
        s3fs.S3FileSystem.clear_instance_cache()  # one made before signs as the old user

    def _set_auth(self, unchecked):
        """Let the next `unchecked` requests through unchecked ("inf": all of them, moto's default)."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=unchecked.encode(),
                                         method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=10).close()

    def close(self):
        import s3fs

        self._set_auth("inf")  # the setting is the process's: a later server must not inherit it
        self._server.stop()
        # fsspec reuses one filesystem per set of options, not per endpoint: a later server's test
        # would otherwise talk to this stopped one.
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
