"""Security: nothing in a suite file or a result is executed or rendered as markup; downloads are verified by
checksum; environments are created only when and where the user asks; no network access during `run`, `report`
or `compare`.

The end-to-end test runs `bench run` (a tiny suite with hostile names, on the jax environment), `bench report`
and `bench compare` as subprocesses with a `sitecustomize.py` first on PYTHONPATH that replaces socket connects
and name lookups with functions that log and raise; workers inherit it (the runner prepends the project root to
PYTHONPATH and keeps the rest), which the test checks from the log of processes that loaded it.
"""

from __future__ import annotations

import gzip
import hashlib
import html.parser
import io
import json
import os
import re
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import yaml

from bench import envs
from bench.cli import main
from bench.data import loaders
from bench.envs import is_ready
from bench.report import make_report, render
from bench.results import result_path, write_rows
from bench.runner import Runner, build_rows
from bench.suite import load_suite

REPO = Path(__file__).resolve().parents[2]

HOSTILE = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(2)>',
    "</script><script>alert(3)</script>",
    "{{7*7}} ${7*7} {% raw %}",
    "' onmouseover='alert(4)' x='",
    "<!-- ]]> <![CDATA[ -->",
    "[click](javascript:alert(5)) <https://evil.example/>",
    "| cell | **bold** `code` _em_ \\ ~~strike~~",
    "line\n# heading\n<b>bold</b>",
    "&lt;already-escaped&gt; &amp; &#x3C;svg onload=alert(6)&#x3E;",
]
# Three values that carry them all (fewer runs to render): each goes into every string column of its runs.
COMBINED = [" ".join(HOSTILE[i::3]) for i in range(3)]

# --------------------------------------------------------------------------- HTML and Markdown: escaping

ALLOWED_TAGS = {
    "html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "div", "ul", "li", "code", "section",
    "table", "thead", "tbody", "tr", "th", "td", "span", "details", "summary", "pre", "script",
}  # fmt: skip


class _Tags(html.parser.HTMLParser):
    """Every start tag of a page, with its attributes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _without_bundle(page: str) -> str:
    """The page without the inlined Vega library (our own code, checked apart)."""
    head, _, rest = page.partition('<script type="module">')
    return head + rest.partition("</script>\n</body>")[2]


def check_html(page: str, hostile: list[str]) -> None:
    """No hostile string reaches the page as markup: only the report's own tags and attributes, every JSON block
    ends where it should, and the strings are there as text (escaped), so nothing was silently dropped."""
    assert page.count('<script type="module">') == 1
    body = _without_bundle(page)
    blocks = re.findall(r'<script type="application/json" data-chart-for="chart-\d+">(.*?)</script>', body, re.S)
    assert len(blocks) == body.count("<script"), "a <script> the report did not write"
    assert blocks, "expected charts"
    texts = set()
    for block in blocks:
        assert "<" not in block and ">" not in block and "&" not in block  # `</script>` cannot end it early
        spec = json.loads(block)
        texts |= {str(v) for rows in spec.get("datasets", {}).values() for row in rows for v in row.values()}
    parser = _Tags()
    parser.feed(body)
    for tag, attrs in parser.tags:
        assert tag in ALLOWED_TAGS, f"<{tag} {attrs}> reached the page"
        assert not any(name.startswith("on") for name in attrs), f"<{tag} {attrs}>"
        assert set(attrs) <= {"lang", "charset", "name", "content", "http-equiv", "class", "id", "style", "title",
                              "type", "data-chart-for", "data-chart-name", "data-chart-count"}, attrs  # fmt: skip
        if tag == "script":
            assert attrs.get("type") == "application/json"
        for value in attrs.values():
            assert not any(h in (value or "") for h in hostile), f"a hostile string in an attribute: {attrs}"
    shown = " ".join(parser.text)
    for h in hostile:
        flat = " ".join(h.split())
        assert flat in " ".join(shown.split()) or any(flat in " ".join(t.split()) for t in texts), h
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)
    assert "default-src 'none'" in csp and "connect-src" not in csp
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", body, re.I), "a page resource off the page"


def check_markdown(md: str, hostile: list[str]) -> None:
    """No raw HTML, link, image or table break from a hostile string; the strings still show (escaped)."""
    for h in hostile:
        for needle in ("<script", "<img", "<b>", "<svg", "<!--", "<https:"):
            if needle in h:
                assert needle not in md, needle
    assert not re.search(r"(?<!\\)\]\(javascript:", md), "a link"
    assert "&#x3C;svg" not in md  # an entity in the data stays text: its & is escaped
    for line in md.splitlines():
        assert not line.startswith("# heading"), "a newline in a value started a Markdown block"
    tables = [b for b in md.split("\n\n") if b.startswith("| ")]
    for table in tables:
        widths = {len(re.split(r"(?<!\\)\|", line)) for line in table.splitlines() if line.startswith("|")}
        assert len(widths) == 1, f"a value broke a table row:\n{table}"
    for h in hostile:  # still shown, as text
        assert all(word in md for word in re.findall(r"[A-Za-z0-9]{4,}", h)), h


def _hostile_rows(text: str, *, dp: bool = True, status: str = "ok", seed: int = 0) -> list[dict]:
    """Result rows with `text` in every string column, written by the real writer's schema."""
    from datetime import UTC, datetime

    base = {
        "run_id": f"{hashlib.md5(text.encode()).hexdigest()[:8]}-{dp:d}-{seed} {text[:12]}".replace("/", "_"),
        "suite": f"suite {text}",
        "workload": f"workload {text}",
        "dataset": f"data {text}",
        "model": f"model {text}",
        "backend": f"jax{text}",
        "variant": f"v{text}",
        "seed": seed,
        "dp": dp,
        "noise_multiplier": 1.0 if dp else None,
        "target_epsilon": None,
        "max_grad_norm": 1.0,
        "batch_size": 64,
        "sampling": "poisson",
        "sample_rate": 0.25,
        "delta": 1e-5,
        "epochs": 2,
        "steps_per_epoch": 4,
        "dataset_size": 256,
        "optimizer": f"sgd {text}",
        "learning_rate": 0.1,
        "workload_kind": "centralized",
        "status": status,
        "error": f"RuntimeError: {text}\nTraceback {text}" if status != "ok" else "",
        "versions": json.dumps({f"lib {text}": f"1.0 {text}"}),
        "python": f"3.11 {text}",
        "hardware": f"cpu {text}",
        "threads": 2,
        "git_commit": f"abc {text}",
        "accounting_note": "",
        "started_at": datetime(2026, 1, 1, tzinfo=UTC),
        "finished_at": datetime(2026, 1, 1, tzinfo=UTC),
        "spec": json.dumps({"suite": text, "workload": text, "backend": text, "seed": seed, "dp": {"enabled": dp}}),
    }
    if status != "ok":
        return [{**base, "epoch": 0}]
    return [
        {**base, "epoch": e, "test_accuracy": 0.5 + 0.1 * e, "epoch_seconds": 1.0, "train_seconds": 0.9,
         "peak_memory_mb": 100.0, "epsilon": 0.5 * e if dp else None, "epsilon_rdp": 0.6 * e if dp else None}
        for e in (1, 2)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def hostile_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = tmp_path_factory.mktemp("hostile") / "results"
    for text in COMBINED:  # a non-private and a DP run that ended ok, and a DP seed that failed
        for rows in (
            _hostile_rows(text, dp=False),
            _hostile_rows(text),
            _hostile_rows(text, status="failed", seed=1),
        ):
            write_rows(result_path(results, rows[0]["suite"], rows[0]["run_id"]), rows)
    return results


def bench(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = env or {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "bench", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_hostile_strings_in_results_are_text_in_the_html_report(hostile_results, tmp_path):
    out = tmp_path / "report.html"
    assert main(["report", str(hostile_results), "--out", str(out)]) == 0
    check_html(out.read_text(), HOSTILE)


def test_hostile_strings_in_results_are_text_in_markdown(hostile_results, capsys):
    assert main(["report", str(hostile_results), "--format", "md"]) == 0
    check_markdown(capsys.readouterr().out, HOSTILE)


def test_hostile_strings_in_a_comparison_are_text_in_markdown(hostile_results, capsys):
    assert main(["compare", str(hostile_results), "--baseline", str(hostile_results), "--format", "md", "-v"]) == 0
    md = capsys.readouterr().out
    assert "workload " in md
    check_markdown(md, [h for h in HOSTILE if "<" in h or "[" in h])
    assert main(["compare", str(hostile_results), "--baseline", str(hostile_results), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["passed"]  # JSON is data: json.dumps escapes, a consumer reads text


def test_a_script_end_tag_in_chart_data_cannot_end_its_block(tmp_path):
    """Inside `<script type="application/json">` only `</script` matters: the page writes `<` as \\u003c."""
    rows = _hostile_rows("</script><script>alert(7)</script><!--")
    write_rows(result_path(tmp_path, rows[0]["suite"], "x"), rows)
    page = render(make_report(tmp_path), "html")
    check_html(page, ["</script><script>alert(7)</script><!--"])
    assert "\\u003c/script\\u003e\\u003cscript\\u003ealert(7)" in page


# --------------------------------------------------------------------------- a real run without network


SITECUSTOMIZE = '''
"""Loaded first by every Python process of the test: logs itself, then blocks network access."""
import os
import socket

_LOG, _LOADED = os.environ["NONET_LOG"], os.environ["NONET_LOADED"]
with open("/proc/self/cmdline", "rb") as _f:
    _cmd = _f.read().replace(b"\\0", b" ").decode(errors="replace")
with open(_LOADED, "a") as _f:
    _f.write(f"{os.getpid()} {_cmd}\\n")


def _refuse(what, detail):
    with open(_LOG, "a") as f:
        f.write(f"{os.getpid()} {what} {detail!r} in {_cmd}\\n")
    raise OSError(101, f"network access refused by the test: {what} {detail!r}")


_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def connect(self, address):
    if self.family == getattr(socket, "AF_UNIX", None):
        return _connect(self, address)
    _refuse("connect", address)


def connect_ex(self, address):
    if self.family == getattr(socket, "AF_UNIX", None):
        return _connect_ex(self, address)
    _refuse("connect_ex", address)


socket.socket.connect = connect
socket.socket.connect_ex = connect_ex
socket.create_connection = lambda address, *a, **k: _refuse("create_connection", address)
socket.getaddrinfo = lambda host, *a, **k: _refuse("getaddrinfo", host)
socket.gethostbyname = lambda host: _refuse("gethostbyname", host)
'''

SUITE = {
    "name": "net <script>alert(1)</script>",
    "description": '"><img src=x onerror=alert(2)> {{7*7}}',
    "backends": ["jax"],
    "seeds": [0],
    "threads": 1,
    "timeout": 300,
    "workloads": [
        {
            "name": "w </script><script>alert(3)</script>",
            "dataset": {"name": "synthetic", "train_size": 256, "test_size": 64, "shape": [8, 8, 1], "num_classes": 4},
            "model": "mlp",
            "train": {"epochs": 2, "batch_size": 64},
            "privacy": [{"dp": False}, {"noise_multiplier": 1.0}],
        }
    ],
}


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`bench run`, `report` (html, md), `compare`, `run --dry-run` and `data` with network access
    refused, environments redirected to an empty folder except for jax's own, which the run uses."""
    if not is_ready("jax"):
        pytest.skip("the jax environment is not created (bench env create jax)")
    root = tmp_path_factory.mktemp("offline")
    site = root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log, loaded = root / "network.log", root / "loaded.log"
    log.touch()
    suite = root / "net.yaml"
    suite.write_text(yaml.safe_dump(SUITE, sort_keys=False))
    results = root / "results"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]),
        "NONET_LOG": str(log),
        "NONET_LOADED": str(loaded),
        "XDG_CACHE_HOME": str(root / "cache"),
    }
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[proxy] = "http://proxy.invalid:3128"  # whoever would fetch something tries it
    commands = {
        "run": ("run", str(suite), "--results", str(results)),
        "dry-run": ("run", str(suite), "--results", str(results), "--dry-run"),
        "report": ("report", str(results), "--out", str(root / "report.html")),
        "report-md": ("report", str(results), "--format", "md"),
        "compare": ("compare", str(results), "--baseline", str(results), "--format", "md", "-v"),
        "data": ("data",),
    }
    procs = {name: bench(*args, cwd=root, env=env, timeout=600) for name, args in commands.items()}
    return {
        "procs": procs,
        "log": log.read_text(),
        "loaded": loaded.read_text(),
        "html": (root / "report.html").read_text() if (root / "report.html").exists() else "",
    }


def test_run_report_and_compare_make_no_network_access(offline):
    for name, proc in offline["procs"].items():
        assert proc.returncode == 0, f"{name}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, name
    assert offline["log"] == "", offline["log"]
    loaded = offline["loaded"].splitlines()
    workers = [line for line in loaded if "bench.worker" in line]
    assert len(workers) == 2, "each worker must have run with the network blocked"
    assert len(loaded) >= len(offline["procs"]) + len(workers)
    assert "2 runs: 2 ok" in offline["procs"]["run"].stdout


def test_hostile_suite_strings_stay_text_through_a_real_run(offline):
    check_html(offline["html"], [SUITE["name"], SUITE["workloads"][0]["name"]])
    md = offline["procs"]["report-md"].stdout
    check_markdown(md, [SUITE["name"], SUITE["workloads"][0]["name"]])
    assert "PASS" in offline["procs"]["compare"].stdout


# --------------------------------------------------------------------------- environments


def test_no_command_but_run_and_env_create_creates_an_environment(tmp_path, monkeypatch):
    """dry-run, report, compare, data and env list never create (or even look for) a backend environment."""
    created = []
    monkeypatch.setattr(envs, "ensure_env", lambda backend, log=print: created.append(backend))
    monkeypatch.setattr("bench.runner.ensure_env", lambda backend, log=print: created.append(backend))
    monkeypatch.setenv("BENCH_ENVS_DIR", str(tmp_path / "envs"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump(SUITE))
    assert main(["run", str(suite), "--dry-run", "--results", str(tmp_path / "r"), "--backends", "jax,opacus"]) == 0
    results = tmp_path / "results"
    for rows in (_hostile_rows("x", dp=False), _hostile_rows("x")):
        write_rows(result_path(results, "s", rows[0]["run_id"]), rows)
    assert main(["report", str(results), "--out", str(tmp_path / "x.html")]) == 0
    assert main(["report", str(results), "--format", "md"]) == 0
    assert main(["compare", str(results), "--baseline", str(results)]) == 0
    assert main(["data"]) == 0 and main(["env", "list"]) == 0
    assert created == [] and not (tmp_path / "envs").exists()
    assert Runner(tmp_path / "r", env="current").python_for("opacus") == sys.executable  # --env current: none
    assert created == []


def test_env_create_only_makes_environments_of_known_backends_in_the_envs_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BENCH_ENVS_DIR", str(tmp_path / "envs"))
    for name in ("../evil", "/tmp/evil", "jax/../../evil", "nope"):
        assert main(["env", "create", name]) == 2
        assert "unknown backend" in capsys.readouterr().err.lower()
    assert not (tmp_path / "envs").exists() and not (tmp_path / "evil").exists()
    assert envs.env_dir("jax") == tmp_path / "envs" / "jax"


def test_a_dry_run_does_not_write_results_either(tmp_path):
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump(SUITE))
    assert main(["run", str(suite), "--dry-run", "--results", str(tmp_path / "r")]) == 0
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- downloads


class _Response(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def _idx_gz(shape: tuple[int, ...], magic: int) -> bytes:
    dims = b"".join(int(d).to_bytes(4, "big") for d in shape)
    return gzip.compress(magic.to_bytes(4, "big") + dims + bytes(int(np.prod(shape))))


def test_downloads_are_verified_and_a_bad_file_is_not_kept(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache = loaders.cache_dir("mnist")
    served: dict[str, bytes] = {}
    urls: list[str] = []

    def urlopen(url, timeout=None):
        urls.append(url)
        return _Response(served[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(loaders.urllib.request, "urlopen", urlopen)

    # 1. The official checksums: bytes that are not MNIST's are rejected, and nothing is left in the cache.
    served.update({name: b"not mnist at all" for _, name, _ in loaders.DOWNLOADS["mnist"]})
    assert main(["data", "--download", "mnist"]) == 2
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and loaders.DOWNLOADS["mnist"][0][2].split(":")[1] in err
    assert urls and all(u.startswith("https://") for u in urls)
    assert sorted(p.name for p in cache.iterdir()) == []

    # 2. Right bytes (checksums of files we serve) are accepted, and load.
    files = {
        "train-images-idx3-ubyte.gz": _idx_gz((3, 28, 28), 2051),
        "train-labels-idx1-ubyte.gz": _idx_gz((3,), 2049),
        "t10k-images-idx3-ubyte.gz": _idx_gz((2, 28, 28), 2051),
        "t10k-labels-idx1-ubyte.gz": _idx_gz((2,), 2049),
    }
    entries = [(f"https://mirror.invalid/{n}", n, "sha256:" + hashlib.sha256(d).hexdigest()) for n, d in files.items()]
    monkeypatch.setitem(loaders.DOWNLOADS, "mnist", entries)
    served.clear()
    served.update(files)
    served["t10k-labels-idx1-ubyte.gz"] = b"tampered"  # one wrong file: that one is refused, the others kept
    assert main(["data", "--download", "mnist"]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert not (cache / "t10k-labels-idx1-ubyte.gz").exists() and not list(cache.glob(".*"))
    served["t10k-labels-idx1-ubyte.gz"] = files["t10k-labels-idx1-ubyte.gz"]
    assert main(["data", "--download", "mnist"]) == 0
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == files
    assert loaders.load_raw("mnist").x_train.shape == (3, 28, 28, 1)

    # 3. A file in the cache that no longer matches its checksum is fetched again, not trusted.
    (cache / "train-labels-idx1-ubyte.gz").write_bytes(b"corrupted on disk")
    urls.clear()
    assert main(["data", "--download", "mnist"]) == 0
    assert urls == ["https://mirror.invalid/train-labels-idx1-ubyte.gz"]
    assert (cache / "train-labels-idx1-ubyte.gz").read_bytes() == files["train-labels-idx1-ubyte.gz"]


def test_a_download_without_network_is_a_clean_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def offline(url, timeout=None):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(loaders.urllib.request, "urlopen", offline)
    assert main(["data", "--download", "cifar10"]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("error: cannot download https://") and "Traceback" not in err
    assert list(loaders.cache_dir("cifar10").iterdir()) == []


def test_nothing_in_a_suite_file_is_executed(tmp_path):
    """Suite strings are data: names with shell and Python syntax load as names and go nowhere near a shell."""
    marker = tmp_path / "pwned"
    data = {
        **SUITE,
        "name": f"$(touch {marker}); `touch {marker}`",
        "description": f"__import__('os').system('touch {marker}')",
    }
    data["workloads"] = [{**SUITE["workloads"][0], "name": f"x; touch {marker} #"}]
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    suite = load_suite(path)
    assert suite.name == data["name"] and suite.runs[0].workload == data["workloads"][0]["name"]
    assert main(["run", str(path), "--dry-run", "--results", str(tmp_path / "r")]) == 0
    rows = build_rows(suite.runs[0], [], "failed", "x", 0.0)
    write_rows(result_path(tmp_path / "r", suite.name, suite.runs[0].run_id), rows)
    assert result_path(tmp_path / "r", suite.name, "x").parent.parent == tmp_path / "r"
    assert main(["report", str(tmp_path / "r"), "--format", "md"]) == 0
    assert not marker.exists()
