"""The wheel: builds without deprecation warnings, carries its package data and license,
and requires only runtime dependencies (the dev tools stay behind the ``dev`` extra).

Built with ``pip wheel --no-deps --no-build-isolation`` from a copy of the sources, so
it needs no network and leaves no build/ or egg-info in the checkout; the build uses
the environment's setuptools (the ``dev`` extra asks for one that knows PEP 639).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEV_TOOLS = {
    "pytest", "pytest-trio", "hypothesis", "trustme", "ruff", "mypy", "httpx",
    "schemathesis", "types-pyyaml", "pyinstaller", "setuptools", "playwright",
}  # fmt: skip


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return match.group().lower().replace("_", "-")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The built wheel and pip's output."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "tq", src / "tq", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    out = subprocess.run(
        [*pip, "--no-index", "-w", str(tmp / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = out.stdout + out.stderr
    assert out.returncode == 0, output
    (built,) = (tmp / "dist").glob("tq-*.whl")
    return built, output


def test_the_build_warns_of_nothing_deprecated(wheel: tuple[Path, str]) -> None:
    _, output = wheel
    assert "deprecat" not in output.lower(), output


def test_metadata_names_the_license_and_only_runtime_dependencies(
    wheel: tuple[Path, str],
) -> None:
    built, _ = wheel
    with zipfile.ZipFile(built) as zf:
        names = zf.namelist()
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(zf.read(metadata_name).decode())
    assert metadata["License-Expression"] == "MIT"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    requires = metadata.get_all("Requires-Dist") or []
    runtime = {_name(r) for r in requires if "extra ==" not in r}
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert runtime == {_name(r) for r in declared["project"]["dependencies"]}
    assert not runtime & DEV_TOOLS, f"dev tools required at run time: {runtime & DEV_TOOLS}"
    dev = {_name(r) for r in requires if re.search(r"""extra\s*==\s*["']dev["']""", r)}
    assert dev >= DEV_TOOLS, f"not in the dev extra: {DEV_TOOLS - dev}"
    console = [r for r in requires if _name(r) == "textual"]
    assert console and all(re.search(r"""extra\s*==\s*["']console["']""", r) for r in console)
    assert any(re.match(r"tq\[[^]]*\bconsole\b", r) for r in requires), "dev includes the console"


def test_wheel_carries_the_package_data_and_the_command(wheel: tuple[Path, str]) -> None:
    built, _ = wheel
    with zipfile.ZipFile(built) as zf:
        names = set(zf.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = zf.read(entry_points).decode()
    tcss = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tq").rglob("*.tcss")}
    assert tcss and tcss <= names, f"missing styles: {tcss - names}"
    web = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tq" / "http" / "web").iterdir()}
    assert {"tq/http/web/index.html", "tq/http/web/app.js"} <= web <= names, web - names
    assert "tq/cli/main.py" in names and "tq/__main__.py" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    assert re.search(r"^tq = tq\.cli\.main:main$", scripts, re.M), scripts


# -- start-up cost: the client path never imports cryptography --------------------------

_CLIENT_PATH = """
import sys
from pathlib import Path
import tq.cli.main
from tq.client import BlockingClient, Client
from tq.security.tls import client_ssl_context
from tq.security.tokens import decode_join_token
client_ssl_context(Path(sys.argv[1]))
token = decode_join_token(sys.argv[2])
client_ssl_context(None, ca_data=token.ca_pem)
print(sorted(m for m in sys.modules if m.split(".")[0] == "cryptography"))
"""


def test_the_client_path_does_not_import_cryptography(tmp_path: Path) -> None:
    """CLI, clients, CA files and join tokens use the standard library's ssl only:
    cryptography costs ~50 ms of every `tq submit` otherwise (it makes certificates,
    which only the broker and admin commands do)."""
    from tq.security.keys import new_key
    from tq.security.tls import ensure_broker_tls
    from tq.security.tokens import encode_join_token

    files, _ = ensure_broker_tls(tmp_path / "tls")
    key, _ = new_key("join", "worker", now=1_700_000_000.0)
    token = encode_join_token(["h1:7470"], files.ca_cert.read_bytes(), key)
    out = subprocess.run(
        [sys.executable, "-c", _CLIENT_PATH, str(files.ca_cert), token],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_a_damaged_ca_is_refused_by_name(tmp_path: Path) -> None:
    """Reading CA files with ssl instead of cryptography keeps the errors readable."""
    import base64

    import msgpack

    from tq.core.errors import ConfigError, TLSFailure
    from tq.security.keys import new_key
    from tq.security.tls import client_ssl_context, ensure_broker_tls
    from tq.security.tokens import decode_join_token, encode_join_token

    files, _ = ensure_broker_tls(tmp_path / "tls")
    pem = files.ca_cert.read_text()
    noted = tmp_path / "noted.pem"  # text around the certificate is allowed
    noted.write_text(f"# the broker's CA\n{pem}\n")
    client_ssl_context(noted)
    damaged = tmp_path / "damaged.pem"  # valid base64, not a certificate
    body = base64.encodebytes(b"not a certificate" * 10).decode()
    damaged.write_text(f"-----BEGIN CERTIFICATE-----\n{body}-----END CERTIFICATE-----\n")
    with pytest.raises(TLSFailure, match=rf"CA certificate {damaged} is not a PEM certificate"):
        client_ssl_context(damaged)
    not_base64 = tmp_path / "bad64.pem"
    not_base64.write_text("-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n")
    with pytest.raises(TLSFailure, match="is not a PEM certificate: pass --ca"):
        client_ssl_context(not_base64)
    key, _ = new_key("join", "worker", now=1_700_000_000.0)
    good = encode_join_token(["h1:7470"], pem, key)
    raw = good.removeprefix("tqj1_")
    fields = msgpack.unpackb(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    fields["ca"] = b"\x30\x03\x02\x01\x00"  # DER, but no certificate
    bad = "tqj1_" + base64.urlsafe_b64encode(msgpack.packb(fields)).decode().rstrip("=")
    with pytest.raises(ConfigError, match="the join token's CA is damaged"):
        decode_join_token(bad)


_WITHOUT_TEXTUAL = """
import sys

class NoTextual:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "textual":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTextual())
sys.argv = ["tq", "tui", "--broker", "127.0.0.1:9", "--insecure"]
from tq.cli.main import main
main()
"""


def test_tui_without_the_console_extra_names_it() -> None:
    """`pip install tq` leaves Textual out: `tq tui` says which extra to install."""
    out = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TEXTUAL], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert "pip install 'tq[console]'" in out.stderr, out.stderr
