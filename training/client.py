"""`trainyard login / datasets / runs`: the command line talking to a Trainyard server over its REST API.

Standard library HTTP (streamed uploads and downloads) and tqdm progress bars; a bearer token
stored in ~/.config/trainyard/credentials.json (readable by the user alone).
"""

from __future__ import annotations

import getpass
import json
import os
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode, urlsplit

CHUNK = 1024 * 1024


class ApiError(RuntimeError):
    def __init__(self, status: int, body: dict | str):
        self.status, self.body = status, body
        message = body.get("message", body) if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {message}")


def credentials_path() -> Path:
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "trainyard" / "credentials.json"


def load_credentials() -> tuple[str, str]:
    path = credentials_path()
    if not path.exists():
        sys.exit("not logged in: run `trainyard login URL` first")
    data = json.loads(path.read_text())
    return data["url"], data["token"]


class Client:
    def __init__(self, url: str, token: str):
        parts = urlsplit(url)
        self.scheme, self.host, self.base = parts.scheme, parts.netloc, parts.path.rstrip("/")
        self.token = token

    def _connection(self):
        import http.client  # here, not at the top: every `trainyard` command imports this module (~20 ms)

        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, timeout=600)

    def request(self, method: str, path: str, body=None, headers=None, stream: bool = False):
        conn = self._connection()
        headers = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        if isinstance(body, (dict, list)):
            body, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        conn.request(method, self.base + path, body=body, headers=headers)
        response = conn.getresponse()
        if stream and response.status < 400:
            return response
        raw = response.read()
        try:
            data = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            data = raw.decode("utf-8", errors="replace")
        if response.status >= 400:
            raise ApiError(response.status, data)
        return data

    def upload(self, path: Path, fields: dict) -> tuple[int, dict]:
        """Multipart POST /api/datasets/ streamed from disk, with a progress bar."""
        from tqdm import tqdm

        boundary = f"----trainyard{uuid.uuid4().hex}"
        head = b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in fields.items()
            if v is not None
        )
        head += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        size = path.stat().st_size
        conn = self._connection()
        conn.putrequest("POST", self.base + "/api/datasets/")
        conn.putheader("Authorization", f"Bearer {self.token}")
        conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        conn.putheader("Content-Length", str(len(head) + size + len(tail)))
        conn.endheaders()
        conn.send(head)
        with path.open("rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"upload {path.name}") as bar:
            while chunk := f.read(CHUNK):
                conn.send(chunk)
                bar.update(len(chunk))
        conn.send(tail)
        response = conn.getresponse()
        body = response.read()
        try:
            return response.status, json.loads(body or b"{}")
        except ValueError:  # a proxy's HTML page (413 Request Entity Too Large, 502, ...)
            return response.status, {"message": f"the server answered {response.status} {response.reason}"}

    def download(self, path: str, target: Path) -> Path:
        from tqdm import tqdm

        response = self.request("GET", path, stream=True)
        total = int(response.getheader("Content-Length") or 0) or None
        tmp = target.with_suffix(target.suffix + ".part")
        with tmp.open("wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=f"download {target.name}") as bar:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
        tmp.replace(target)
        return target


def cmd_login(args) -> int:
    token = (
        args.token
        or os.environ.get("TRAINYARD_TOKEN")
        or getpass.getpass("API token (create one under API tokens in the web app): ")
    )
    client = Client(args.url, token.strip())
    try:
        client.request("GET", "/api/runs/")
    except (ApiError, OSError) as exc:
        print(f"error: can't log in to {args.url}: {exc}", file=sys.stderr)
        return 1
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, even briefly
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"url": args.url.rstrip("/"), "token": token.strip()}))
    print(f"logged in to {args.url} (token saved in {path})")
    return 0


def _client() -> Client:
    return Client(*load_credentials())


def cmd_upload(args) -> int:
    path = Path(args.file)
    if not path.is_file():
        print(f"error: no file {path}", file=sys.stderr)
        return 2
    status, body = _client().upload(
        path, {"name": args.name, "format": args.format, "keep_valid": "true" if args.keep_valid else None}
    )
    if status >= 400:
        print(f"error: {body.get('message', body)}", file=sys.stderr)
        for p in body.get("problems", [])[:20]:
            print(f"  line {p['line']}: {p['field'] + ': ' if p['field'] else ''}{p['message']}", file=sys.stderr)
        return 1
    d = body["dataset"]
    note = " (already uploaded)" if body["duplicate"] else ""
    print(f"dataset {d['id']} “{d['name']}”: {d['rows']} rows, {d['format']}{note}")
    return 0


def cmd_runs_create(args) -> int:
    import yaml

    client = _client()
    text = Path(args.config).read_text(encoding="utf-8")
    if args.dataset:
        dataset = client.request("GET", f"/api/datasets/{args.dataset}")
        data = yaml.safe_load(text)
        for entry in data.get("datasets") or [{}]:
            entry["path"] = dataset["name"]
        data.setdefault("datasets", [{"path": dataset["name"]}])
        text = yaml.safe_dump(data, sort_keys=False)
    name = args.name or f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        config = client.request("POST", "/api/configs/", {"name": name, "yaml": text})
        run = client.request(
            "POST", "/api/runs/", {"config_id": config["id"], "gpus": args.gpus, "priority": args.priority}
        )
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        for e in exc.body.get("errors", []) if isinstance(exc.body, dict) else []:
            print(f"  {e['path']}: {e['message']}", file=sys.stderr)
        return 1
    url, _ = load_credentials()
    print(f"run {run['id']} queued: {url}/runs/{run['id']}/")
    return 0


def cmd_runs_watch(args) -> int:
    from tqdm import tqdm

    client = _client()
    after, bar = -1, None
    while True:
        run = client.request("GET", f"/api/runs/{args.run}")
        points = client.request("GET", f"/api/runs/{args.run}/metrics?" + urlencode({"after": after}))
        if bar is None and run["total_steps"]:
            bar = tqdm(total=run["total_steps"], desc=f"run {args.run}", unit="step")
        for p in points:
            after = p["seq"]
            if bar is not None and "loss" in p["values"]:
                bar.set_postfix(loss=p["values"]["loss"])
        if bar is not None:
            bar.n = run["current_step"]
            bar.refresh()
        if run["status"] in ("succeeded", "failed", "cancelled", "interrupted"):
            if bar is not None:
                bar.close()
            print(f"run {args.run} {run['status']}: {run['message']}")
            return 0 if run["status"] == "succeeded" else 1
        time.sleep(args.interval)


def cmd_runs_download(args) -> int:
    client = _client()
    artifacts = client.request("GET", f"/api/runs/{args.run}/artifacts")
    wanted = [a for a in artifacts if a["kind"] == args.kind] or [
        a for a in artifacts if a["kind"] in ("adapter", "model")
    ]
    if not wanted:
        print(f"error: run {args.run} has no {args.kind} to download (yet)", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = client.download(wanted[0]["download_url"], out / f"run-{args.run}-{Path(wanted[0]['path']).name}")
    print(f"saved {target}")
    return 0


def _friendly(command):
    """A server that answers an error, or can't be reached, is one line on stderr, not a traceback."""

    def run(args) -> int:
        try:
            return command(args)
        except ApiError as exc:
            print(f"error: {exc}", file=sys.stderr)
        except OSError as exc:
            print(f"error: can't reach the server: {exc}", file=sys.stderr)
        return 1

    return run


def add_commands(sub) -> None:
    p = sub.add_parser("login", help="store a server URL and an API token for the commands below")
    p.add_argument("url")
    p.add_argument("--token", help="default: $TRAINYARD_TOKEN, else asked for")
    p.set_defaults(func=_friendly(cmd_login))

    datasets = sub.add_parser("datasets", help="datasets on the server").add_subparsers(dest="action", required=True)
    p = datasets.add_parser("upload", help="upload a JSONL file (progress bar; broken lines listed)")
    p.add_argument("file")
    p.add_argument("--name")
    p.add_argument("--format", choices=["chat_template", "alpaca", "completion", "input_output"])
    p.add_argument("--keep-valid", action="store_true", help="store the valid rows even if some lines are broken")
    p.set_defaults(func=_friendly(cmd_upload))

    runs = sub.add_parser("runs", help="runs on the server").add_subparsers(dest="action", required=True)
    p = runs.add_parser("create", help="create a config from YAML and queue a run of it")
    p.add_argument("config")
    p.add_argument("--dataset", type=int, help="dataset id: replaces the datasets' paths")
    p.add_argument("--name")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--priority", type=int, default=0)
    p.set_defaults(func=_friendly(cmd_runs_create))
    p = runs.add_parser("watch", help="live progress until the run ends")
    p.add_argument("run", type=int)
    p.add_argument("--interval", type=float, default=1.0)
    p.set_defaults(func=_friendly(cmd_runs_watch))
    p = runs.add_parser("download", help="download the run's adapter (or model) zip")
    p.add_argument("run", type=int)
    p.add_argument("--kind", default="adapter", choices=["adapter", "model", "merged"])
    p.add_argument("--out", default=".")
    p.set_defaults(func=_friendly(cmd_runs_download))
