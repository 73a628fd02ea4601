"""The settings object: parsing from the environment, validation, and the README documents
every field."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from runflow_worker.cli.main import main
from runflow_worker.errors import ConfigError
from runflow_worker.settings import GpuClass, InvalidSettings, Settings, parse_ladder

README = Path(__file__).parent.parent / "README.md"
REPO = Path(__file__).parent.parent

pytestmark = pytest.mark.usefixtures("no_runflow_env")


def test_every_setting_is_documented_in_the_readme() -> None:
    text = README.read_text()
    names = [field.validation_alias if isinstance(field.validation_alias, str)
             else f"RUNFLOW_{name.upper()}" for name, field in Settings.model_fields.items()]
    missing = [name for name in names if f"`{name}`" not in text]
    assert missing == []


def test_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RUNFLOW_URL_ALLOW", "127.0.0.1/32, files.internal, *.corp, ::1")
    monkeypatch.setenv("RUNFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("RUNFLOW_GPU_LADDER", "cpu:0,l4:24,h100:80")
    monkeypatch.setenv("RUNFLOW_GPU_CLASS", " L4 ")
    monkeypatch.setenv("RUNFLOW_LEASE_S", "5")
    monkeypatch.setenv("RUNFLOW_LOG_LEVEL", "debug")
    monkeypatch.setenv("RUNFLOW_WEBHOOK_SECRET", "whsec_c2VjcmV0")
    monkeypatch.setenv("RUNFLOW_GIT_MIRRORS", "https://github.com/a/b=/m/b, https://x/y=~/y")
    monkeypatch.setenv("RUNFLOW_CHILD_ENV_PASS", "HF_TOKEN, _PRIVATE2")
    monkeypatch.setenv("RUNFLOW_PRESIGN_TTL_S", "604800")
    s = Settings()
    assert s.url_allow == ("127.0.0.1/32", "files.internal", "*.corp", "::1")
    assert s.ladder == (GpuClass("cpu", 0), GpuClass("l4", 24), GpuClass("h100", 80))
    assert s.gpu_class == "l4" and s.log_level == "DEBUG" and s.presign_ttl_s == 604800
    assert s.lease_s == 5 and s.blobs_dir == tmp_path / "blobs"
    assert s.effective_storage_url == (tmp_path / "outputs").resolve().as_uri()
    assert s.git_mirror_map() == {"https://github.com/a/b": Path("/m/b"),
                                  "https://x/y": Path("~/y").expanduser()}
    assert s.child_env_pass == ("HF_TOKEN", "_PRIVATE2")
    assert "c2VjcmV0" not in repr(s)  # secrets never printed
    with pytest.raises(ValidationError):
        s.lease_s = 3  # frozen


def test_empty_variables_count_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PORT", "LEASE_S", "GPU_CLASS", "STORAGE_URL", "WEBHOOK_SECRET",
                 "URL_ALLOW", "LOG_LEVEL", "CHILD_ENV_PASS", "CACHE_MAX_BYTES"):
        monkeypatch.setenv(f"RUNFLOW_{name}", "")
    s = Settings()
    assert (s.http_port, s.lease_s, s.gpu_class, s.storage_url, s.webhook_secret) == (
        9090, 60.0, None, None, None)
    assert (s.url_allow, s.log_level, s.child_env_pass, s.cache_max_bytes) == (
        (), "INFO", (), None)


@pytest.mark.parametrize("bad", ["", "l4", "l4:x", "l4:24,l4:24", "l4:inf", "l4:-1"])
def test_bad_ladders(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_ladder(bad)


SECRET = "hunter2-secret"
PASSWORD = "s3cr3tpass"

BAD_VALUES = [
    # variable, value, words the one-line message must hold
    ("RUNFLOW_LEASE_S", "inf", "finite"),
    ("RUNFLOW_LEASE_S", "nan", "finite"),
    ("RUNFLOW_IDLE_EXIT_S", "1e300", "less than or equal"),
    ("RUNFLOW_MAX_DELIVERIES", "0", "greater than or equal to 1"),
    ("RUNFLOW_HTTP_PORT", "http", "integer"),
    ("RUNFLOW_LOG_LEVEL", "verbose", "DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ("RUNFLOW_STORAGE_URL", "ftp://x", "s3://bucket/prefix or file:///dir"),
    ("RUNFLOW_STORAGE_URL", "s3:///prefix", "no bucket"),
    ("RUNFLOW_WEBHOOK_SECRET", SECRET, "whsec_ followed by base64"),
    ("RUNFLOW_WEBHOOK_SECRET", "whsec_", "whsec_ followed by base64"),
    ("RUNFLOW_URL_ALLOW", "127.0.0.1/32,10.0.0.0/33", "'10.0.0.0/33' is neither a CIDR"),
    ("RUNFLOW_URL_ALLOW", "300.1.2.3", "neither a CIDR"),
    ("RUNFLOW_URL_ALLOW", "bad host!", "neither a CIDR"),
    ("RUNFLOW_GIT_MIRRORS", "https://x/a=/m/a,/m/b", "entry 2 ('/m/b') is not origin=path"),
    ("RUNFLOW_GIT_MIRRORS", "https://x/a=", "entry 1"),
    ("RUNFLOW_PRESIGN_TTL_S", "604801", "at most 604800 seconds"),
    ("RUNFLOW_REDIS_URL", f"http://:{PASSWORD}@db:6379/0", "redis://"),
    ("RUNFLOW_REDIS_URL", f"redis://:{PASSWORD}@db:port/0", "malformed"),
    ("RUNFLOW_REDIS_URL", f"redis://:{PASSWORD}@db/zero", "database is not a number"),
    ("RUNFLOW_S3_ENDPOINT_URL", f"s3://key:{PASSWORD}@minio", "http(s)://host"),
    ("RUNFLOW_GPU_CLASS", "X100", "'x100' is not on the ladder"),
    ("RUNFLOW_CA_BUNDLE", "/no/such/ca.pem", "not a file"),
    ("RUNFLOW_RUNNER_ENTRY", "runflow_worker.runtime.child", "module:function"),
    ("RUNFLOW_CHILD_ENV_PASS", "HF_TOKEN,2FA", "'2FA' is not an environment variable name"),
    ("RUNFLOW_CHILD_ENV_PASS", f"HF_TOKEN={SECRET}", "names only"),
    ("RUNFLOW_SANDBOX_READ_ONLY", "lib/nvidia", "'lib/nvidia' is not an absolute path"),
    ("RUNFLOW_SANDBOX_READ_ONLY", "/no/such/driver", "'/no/such/driver' does not exist"),
]


@pytest.mark.parametrize(("var", "value", "expected"), BAD_VALUES)
def test_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, var: str, value: str,
                                      expected: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(InvalidSettings) as caught:
        Settings()
    assert isinstance(caught.value, ConfigError)
    assert [v for v, _ in caught.value.problems] == [var]
    message = str(caught.value)
    assert message.startswith(f"{var}: ") and expected in message, message
    assert "\n" not in message
    assert SECRET not in message and PASSWORD not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_every_bad_variable_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNFLOW_LEASE_S", "inf")
    monkeypatch.setenv("RUNFLOW_LOG_LEVEL", "verbose")
    with pytest.raises(InvalidSettings) as caught:
        Settings()
    assert sorted(v for v, _ in caught.value.problems) == ["RUNFLOW_LEASE_S",
                                                           "RUNFLOW_LOG_LEVEL"]


def test_keyword_values_are_checked_too(tmp_path: Path) -> None:
    with pytest.raises(InvalidSettings, match="RUNFLOW_LEASE_S: expected a finite number"):
        Settings(cache_dir=tmp_path, lease_s=float("inf"))


@pytest.mark.parametrize("command", [["serve", "--burst"], ["run", "deployed.json"],
                                     ["status", "some-run"], ["cache", "ls"], ["doctor"]])
def test_cli_exits_2_with_one_line(monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str],
                                   command: list[str]) -> None:
    monkeypatch.setenv("RUNFLOW_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("RUNFLOW_REDIS_URL", f"redis://:{PASSWORD}@db:port/0")
    assert main(command) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("runflow-worker: invalid configuration: ")
    assert "RUNFLOW_WEBHOOK_SECRET: " in line and "RUNFLOW_REDIS_URL: " in line
    assert SECRET not in line and PASSWORD not in line


def test_cli_config_errors_of_a_command_exit_2(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    """A ConfigError a command raises while starting is one line and exit 2 as well."""
    from runflow_worker.cli import doctor as doctor_cli

    def refuse(args: object, settings: Settings) -> int:
        raise ConfigError(f"storage URL 'https://user:{PASSWORD}@host/x' is refused")

    monkeypatch.setenv("RUNFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(doctor_cli, "doctor_command", refuse)
    assert main(["doctor"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("runflow-worker doctor: storage URL") and PASSWORD not in line


def test_serve_with_bad_settings_exits_2_without_traceback(tmp_path: Path) -> None:
    """The console entry point as an operator meets it: a subprocess, no Redis needed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNFLOW_")}
    env.update({"PYTHONPATH": str(REPO), "RUNFLOW_CACHE_DIR": str(tmp_path / "cache"),
                "RUNFLOW_LEASE_S": "inf", "RUNFLOW_HTTP_PORT": ""})
    proc = subprocess.run([sys.executable, "-m", "runflow_worker.cli.main", "serve", "--burst"],
                          capture_output=True, text=True, env=env, timeout=60, check=False,
                          cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("runflow-worker: invalid configuration: RUNFLOW_LEASE_S: "
                                   "expected a finite number")


def test_child_env_pass_reaches_the_pipeline(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    from runflow_worker.run.assembly import build_pipeline

    monkeypatch.setenv("RUNFLOW_CHILD_ENV_PASS", "HF_TOKEN,CIVITAI_TOKEN")
    settings = Settings(cache_dir=tmp_path / "cache", comfyui_dir=tmp_path, gpu_class="cpu")
    pipeline = build_pipeline(settings)
    try:
        assert pipeline.config.child_env_pass == ("HF_TOKEN", "CIVITAI_TOKEN")
    finally:
        pipeline.close()


def test_sandbox_read_only_reaches_the_pipeline(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    from runflow_worker.run.assembly import build_pipeline

    driver = tmp_path / "driver"
    driver.mkdir()
    monkeypatch.setenv("RUNFLOW_SANDBOX_READ_ONLY", str(driver))
    settings = Settings(cache_dir=tmp_path / "cache", comfyui_dir=tmp_path, gpu_class="cpu")
    pipeline = build_pipeline(settings, sandbox_read_only=(tmp_path / "tests",))
    try:
        assert pipeline.config.sandbox_read_only == (driver, tmp_path / "tests")
    finally:
        pipeline.close()
