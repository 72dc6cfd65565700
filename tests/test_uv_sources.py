"""scripts/demo.py with-pip-sources: what `pip config list` says about where pip install finds
wheels, told to uv in its own variables (make demo ENV_MANAGER=uv, tests/test_e2e_uv.py)."""
import importlib.util
import os
import subprocess
import sys

from support.store import PROJECT

spec = importlib.util.spec_from_file_location("demo_script", PROJECT / "scripts" / "demo.py")
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)

LISTED = """download.find-links='/only/for/pip/download'
global.extra-index-url='file:///a/simple file:///b/simple'
global.find-links='/global/wheels'
global.index-url='https://global.example/simple'
install.index-url='https://install.example/simple'
:env:.find-links='/env/wheels /more/wheels'
"""


def test_pip_installs_own_order_env_then_install_then_global_and_no_other_section():
    assert demo.uv_sources(LISTED, {}) == {
        "UV_FIND_LINKS": "/env/wheels,/more/wheels",  # :env: over global; download's never; commas for uv
        "UV_DEFAULT_INDEX": "https://install.example/simple",  # install over global
        "UV_INDEX": "file:///a/simple file:///b/simple",
        "UV_INDEX_STRATEGY": "unsafe-best-match",  # pip's rule, for pip's own extra indexes
    }


def test_a_uv_variable_of_the_users_wins_and_their_index_keeps_uvs_own_strategy():
    sources = demo.uv_sources(LISTED, {"UV_INDEX": "https://mine.example/simple", "UV_DEFAULT_INDEX": "x"})
    assert sources == {"UV_FIND_LINKS": "/env/wheels,/more/wheels"}


def test_pips_certificate_and_trusted_hosts_go_to_uv_and_no_index_keeps_uv_off_every_index():
    listed = LISTED + ":env:.cert='/corp/ca.pem'\nglobal.trusted-host='pypi.corp mirror.corp'\nglobal.no-index='true'\n"
    assert demo.uv_sources(listed, {}) == {
        "UV_FIND_LINKS": "/env/wheels,/more/wheels",
        "SSL_CERT_FILE": "/corp/ca.pem",
        "UV_INSECURE_HOST": "pypi.corp mirror.corp",
        "UV_OFFLINE": "1",  # pip reads find-links alone, all on disk: uv installs the same offline
    }
    remote = listed.replace("'/env/wheels /more/wheels'", "'/env/wheels https://wheels.corp/links'")
    sources = demo.uv_sources(remote, {})  # offline would lose the remote find-links: pip's indexes, as before
    assert "UV_OFFLINE" not in sources and sources["UV_DEFAULT_INDEX"] == "https://install.example/simple"
    assert "UV_OFFLINE" not in demo.uv_sources(listed, {"UV_INDEX": "https://mine.example/simple"})  # yours wins
    assert "UV_OFFLINE" not in demo.uv_sources(LISTED + "global.no-index='false'\n", {})


def test_nothing_configured_sets_nothing():
    assert demo.uv_sources("", {}) == {}
    assert demo.uv_sources("global.timeout='60'\n", {}) == {}



def test_make_lets_python_write_its_bytecode_even_where_the_machine_says_not_to():
    """Where PYTHONDONTWRITEBYTECODE is set and uv compiles nothing, no process would ever write a
    .pyc: make's recipes run without it, so the first import of torch and MLflow writes them."""
    proc = subprocess.run(["make", "-s", "-C", str(PROJECT), "--eval", "show-env: ; @env", "show-env"],
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, capture_output=True, text=True,
                          check=True, timeout=60)
    names = {line.partition("=")[0] for line in proc.stdout.splitlines()}
    assert "PATH" in names and "PYTHONDONTWRITEBYTECODE" not in names


def test_a_list_over_several_lines_in_pip_conf_is_each_item_and_an_index_token_is_never_printed(monkeypatch, capsys):
    # pip config list prints a value's repr: a pip.conf list over several lines reads '\n/a\n/b'
    listed = ("global.find-links='\\n/opt/w1\\n/opt/w2'\n"
              "global.extra-index-url='\\nhttps://__token__:s3cret@registry.corp/simple\\nfile:///b/simple'\n")
    sources = demo.uv_sources(listed, {})
    assert sources["UV_FIND_LINKS"] == "/opt/w1,/opt/w2"
    assert sources["UV_INDEX"] == "https://__token__:s3cret@registry.corp/simple file:///b/simple"  # uv needs it
    monkeypatch.setattr(demo.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, listed, ""))
    ran = []
    monkeypatch.setattr(demo.os, "execvpe", lambda path, argv, env: ran.append(env))
    demo.with_pip_sources("uv", "pip", "install")
    err = capsys.readouterr().err
    assert "s3cret" not in err and "https://***@registry.corp/simple file:///b/simple" in err
    assert ran[0]["UV_INDEX"] == sources["UV_INDEX"]  # what uv is given is whole


def test_make_install_refuses_another_python_in_one_line_before_it_makes_anything(tmp_path):
    fake = tmp_path / "python3.12"  # a Python 3.12, as far as the check can tell
    fake.write_text(f"#!{sys.executable}\nimport sys\ncode = sys.argv[2]\nsys.version_info = (3, 12, 1, 'final', 0)\n"
                    f"exec(code)\n")
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    proc = subprocess.run(["make", "-s", "-C", str(PROJECT), f"{venv}/.installed", f"VENV={venv}", f"PYTHON={fake}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and not venv.exists()
    assert f"{fake} is Python 3.12: this project needs 3.11 (pyproject.toml); run make again with " \
           f"PYTHON=python3.11" in proc.stderr
