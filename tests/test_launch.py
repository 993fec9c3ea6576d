"""Launch scripts: their --dry_run prints every command they would run (no gcloud, no GPU needed)."""

import os
import pathlib
import shlex
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def dry_run(script: str, *args: str) -> list[list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(["bash", str(ROOT / "launch" / script), "--dry_run", *args],
                         capture_output=True, text=True, env=env, check=True, cwd=ROOT)
    return [shlex.split(line) for line in out.stdout.splitlines()]


def failing(script: str, *args: str) -> str:
    out = subprocess.run(["bash", str(ROOT / "launch" / script), "--dry_run", *args],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2, out
    return out.stderr


POD = ["--name", "xmag", "--zone", "us-east5-a", "--accelerator", "v5p-256", "--config",
       "configs/uni2h_vits14.py", "--data", "gs://bkt/pairs", "--workdir", "gs://bkt/runs/uni2h"]


def ssh_command(cmd: list[str]) -> str:
    return cmd[cmd.index("--command") + 1]


def test_tpu_pod_all_steps_in_order():
    cmds = dry_run("tpu_pod.sh", *POD, "--", "--config.total_steps=100")
    assert cmds[0][:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert cmds[0][cmds[0].index("--accelerator-type") + 1] == "v5p-256"
    assert cmds[0][cmds[0].index("--node-id") + 1] == "xmag"
    assert cmds[0][cmds[0].index("--runtime-version") + 1] == "v2-alpha-tpuv5"
    assert cmds[1][3:5] == ["queued-resources", "describe"]
    assert cmds[2][:2] == ["git", "-C"] and "archive" in cmds[2]
    tarball = cmds[2][-2].split("=", 1)[1]
    assert cmds[3][3:5] == ["tpu-vm", "scp"] and cmds[3][5] == tarball and "--worker=all" in cmds[3]
    ssh = [c for c in cmds if c[3:5] == ["tpu-vm", "ssh"]]
    assert len(ssh) == 4 and all("--worker=all" in c and c[5] == "xmag" for c in ssh)
    assert "tar -xzf xmag_jax.tar.gz" in ssh_command(ssh[0])
    assert "pip install" in ssh_command(ssh[1]) and "jax[tpu]" in ssh_command(ssh[1])
    # gs:// pair shards are read through a gcsfuse mount on every worker (array_record reads local files)
    assert "gcsfuse --implicit-dirs bkt /gcs/bkt" in ssh_command(ssh[2])
    train = shlex.split(ssh_command(ssh[3]).split("nohup", 1)[1].split(">", 1)[0])
    assert train == [".venv/bin/python", "-m", "xmag_jax.train", "--distributed", "--config", "configs/uni2h_vits14.py",
                     "--workdir", "gs://bkt/runs/uni2h", "--config.data.dir=/gcs/bkt/pairs",
                     "--config.total_steps=100"]
    assert len(cmds) == 8


def test_tpu_pod_multislice_spot_git_and_teardown():
    cmds = dry_run("tpu_pod.sh", *POD[:4], "--accelerator", "v5e-256", "--slices", "2", "--spot",
                   "--repo", "https://github.com/org/xmag_jax", "--ref", "v0.1", "create", "code", "delete")
    create = cmds[0]
    assert create[create.index("--accelerator-type") + 1] == "v5litepod-256"
    assert create[create.index("--node-count") + 1] == "2" and create[create.index("--node-prefix") + 1] == "xmag"
    assert "--spot" in create and "--node-id" not in create
    code = [c for c in cmds if c[3:5] == ["tpu-vm", "ssh"]]
    assert [c[5] for c in code] == ["xmag-0", "xmag-1"]
    assert "fetch -q --depth 1 https://github.com/org/xmag_jax v0.1" in ssh_command(code[0])
    assert cmds[-1][3:6] == ["queued-resources", "delete", "xmag-qr"]


def test_tpu_pod_gcsfuse_mount_for_the_data():
    args = [*POD[:8], "--data", "/gcs/bkt/pairs", "--workdir", "gs://bkt/runs/uni2h", "--gcsfuse", "gs://bkt"]
    install, mount, train = dry_run("tpu_pod.sh", *args, "install", "train")
    assert "pip install" in ssh_command(install)
    assert "--worker=all" in mount and "gcsfuse --implicit-dirs bkt /gcs/bkt" in ssh_command(mount)
    assert "--config.data.dir=/gcs/bkt/pairs" in ssh_command(train)


def test_tpu_pod_direct_vm():
    cmds = dry_run("tpu_pod.sh", *POD, "--direct", "create", "delete")
    assert cmds[0][3:6] == ["tpu-vm", "create", "xmag"] and cmds[0][cmds[0].index("--version") + 1] == "v2-alpha-tpuv5"
    assert cmds[1][3:6] == ["tpu-vm", "delete", "xmag"]


@pytest.mark.parametrize("args, message", [
    (["--zone", "z", "status"], "--name is required"),
    (POD[:6] + ["--config", "c.py", "--data", "/local/pairs", "--workdir", "gs://b/w"], "--data must be gs://"),
    (POD[:6] + ["--config", "c.py", "--data", "gs://b/p", "--gcsfuse", "c", "--workdir", "gs://b/w"],
     "is in bucket b but --gcsfuse mounts c"),
    (POD[:6] + ["--config", "c.py", "--data", "gs://b/p", "--workdir", "/tmp/w"], "--workdir must be a gs://"),
    (POD + ["--slices", "2", "--direct"], "needs a queued resource"),
    (POD[:8] + ["--data", "/gcs/other/p", "--workdir", "gs://b/w", "--gcsfuse", "b"], "with --gcsfuse BUCKET"),
    (POD + ["--bogus"], "unknown argument '--bogus'"),
])
def test_tpu_pod_bad_input(args, message):
    assert message in failing("tpu_pod.sh", *args)


def test_gpu_single_defaults_and_flags():
    [cmd] = dry_run("gpu_single.sh")
    assert cmd[0] == "env"
    env = dict(a.split("=", 1) for a in cmd[1:] if "=" in a and not a.startswith("-"))
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["JAX_PLATFORMS"] == "cuda"
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.75"
    assert "--xla_gpu_deterministic_ops=true" in env["XLA_FLAGS"].split()
    train = cmd[cmd.index("-m"):]
    assert train == ["-m", "xmag_jax.train", "--config", "configs/debug.py", "--workdir", "/tmp/xmag_gpu"]


def test_gpu_single_install_and_options():
    cmds = dry_run("gpu_single.sh", "--install", "--gpu", "3", "--nopreallocate", "--nondeterministic",
                   "--data", "demo_out/pairs", "--", "--config.total_steps=5")
    assert cmds[0] == ["python3", "-m", "venv", ".venv"]
    assert "jax[cuda13]" in cmds[1] and "-e" in cmds[1]
    run = cmds[2]
    assert "CUDA_VISIBLE_DEVICES=3" in run and "XLA_PYTHON_CLIENT_PREALLOCATE=false" in run
    assert not any(a.startswith("XLA_FLAGS=") or a.startswith("XLA_PYTHON_CLIENT_MEM_FRACTION") for a in run)
    assert run[-2:] == ["--config.data.dir=demo_out/pairs", "--config.total_steps=5"]


@pytest.mark.parametrize("args, message", [
    (["--mem_fraction", "1.5"], "--mem_fraction must be in (0, 1]"),
    (["--gpu", "0,1"], "one GPU index"),
])
def test_gpu_single_bad_input(args, message):
    assert message in failing("gpu_single.sh", *args)
