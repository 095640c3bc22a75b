"""The cluster-launch files: accelerate configs load with accelerate's own loader, and the two launch scripts
build the right `accelerate launch` line (run against stub `srun`, `scontrol`, `scancel` and `accelerate` that echo)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DistributedType
from accelerate.utils import constants as accelerate_constants

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "recipes" / "accelerate"
SBATCH = ROOT / "scripts" / "slurm" / "lora-rl.sbatch"
LAUNCHER = ROOT / "scripts" / "launch_multi_gpu.sh"
EXPECTED_TYPE = {
    "single_gpu": DistributedType.NO,
    "multi_gpu": DistributedType.MULTI_GPU,
    "fsdp": DistributedType.FSDP,
    "deepspeed_zero2": DistributedType.DEEPSPEED,
    "deepspeed_zero3": DistributedType.DEEPSPEED,
}
# Values accelerate parses from strings at launch time; a typo there would only fail on the cluster.
ALLOWED_VALUES = {
    "fsdp_auto_wrap_policy": accelerate_constants.FSDP_AUTO_WRAP_POLICY,
    "fsdp_reshard_after_forward": [True, False, *accelerate_constants.FSDP_SHARDING_STRATEGY],  # FSDP2: a bool
    "fsdp_backward_prefetch": accelerate_constants.FSDP_BACKWARD_PREFETCH,
    "fsdp_state_dict_type": accelerate_constants.FSDP_STATE_DICT_TYPE,
    "deepspeed_multinode_launcher": accelerate_constants.DEEPSPEED_MULTINODE_LAUNCHERS,
    "offload_optimizer_device": ["none", "cpu", "nvme"],
    "offload_param_device": ["none", "cpu", "nvme"],
}


def config_problems(path: Path) -> list[str]:
    """Load `path` as `accelerate launch --config_file` does; return what launch would ignore or misread.

    accelerate's loader rejects unknown top-level keys itself. Keys under fsdp_config / deepspeed_config are
    copied onto `accelerate launch`'s arguments (fsdp_config keys with an fsdp_ prefix), so any key that is not
    one of those arguments would be silently ignored: those are reported here, with unknown enum values.
    """
    config = load_config_from_file(str(path))
    launch_options = {action.dest for action in launch_command_parser()._actions}
    problems = []
    for section in ("fsdp_config", "deepspeed_config"):
        for key, value in getattr(config, section).items():
            option = key if section != "fsdp_config" or key.startswith("fsdp") else f"fsdp_{key}"
            if option not in launch_options:
                problems.append(f"{section}.{key}: not an accelerate launch option")
            elif option in ALLOWED_VALUES and value not in ALLOWED_VALUES[option]:
                problems.append(f"{section}.{key}: {value!r} is not one of {ALLOWED_VALUES[option]}")
    return problems


def test_the_shipped_configs_are_the_documented_ones():
    assert {path.stem for path in CONFIG_DIR.glob("*.yaml")} == set(EXPECTED_TYPE)


@pytest.mark.parametrize("name", sorted(EXPECTED_TYPE))
def test_config_loads_with_accelerate(name):
    path = CONFIG_DIR / f"{name}.yaml"
    assert config_problems(path) == []
    config = load_config_from_file(str(path))
    assert config.distributed_type == EXPECTED_TYPE[name]
    # The recipe's train.mixed_precision is what runs (it is passed to Accelerator); the file must not claim another.
    assert config.mixed_precision == "no"
    # The header tells users the exact launch line, naming this very file.
    header = path.read_text().split("\ncompute_environment:")[0]
    assert all(line.startswith("#") for line in header.splitlines())
    assert f"accelerate launch --config_file recipes/accelerate/{name}.yaml" in header


def test_sharded_configs_can_save_the_adapter():
    fsdp = load_config_from_file(str(CONFIG_DIR / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2  # lora-rl refuses FSDP1 (peft cannot save its per-block wrapped LoRA)
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_reshard_after_forward"] is True
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    for name, stage in [("deepspeed_zero2", 2), ("deepspeed_zero3", 3)]:
        deepspeed = load_config_from_file(str(CONFIG_DIR / f"{name}.yaml")).deepspeed_config
        assert deepspeed["zero_stage"] == stage
        assert deepspeed["deepspeed_multinode_launcher"] == "standard"  # one torchrun per node, as srun starts
        assert "gradient_accumulation_steps" not in deepspeed  # it would silently replace the recipe's
    zero3 = load_config_from_file(str(CONFIG_DIR / "deepspeed_zero3.yaml")).deepspeed_config
    assert zero3["zero3_save_16bit_model"] is True


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("num_machines: 1", "num_machine: 1", "unknown keys (['num_machine'])"),
        ("fsdp_offload_params: false", "fsdp_offload_param: false", "fsdp_config.fsdp_offload_param: not an"),
        ("FULL_STATE_DICT", "FULL_STATE_DCT", "fsdp_config.fsdp_state_dict_type: 'FULL_STATE_DCT' is not one of"),
    ],
)
def test_a_typo_in_a_config_fails(tmp_path, old, new, problem):
    path = tmp_path / "fsdp.yaml"
    path.write_text((CONFIG_DIR / "fsdp.yaml").read_text().replace(old, new))
    try:
        problems = config_problems(path)
    except ValueError as error:
        problems = [str(error)]
    assert any(problem in line for line in problems), problems


@pytest.mark.parametrize("script", [SBATCH, LAUNCHER], ids=lambda p: p.name)
def test_script_parses(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


STUBS = {
    # Like srun inside a 2-node allocation: the command once per node, with that node's SLURM_NODEID.
    "srun": 'while [[ $1 == -* ]]; do shift; done\nfor ((n = 0; n < SLURM_NNODES; n++)); do SLURM_NODEID=$n "$@"; done',
    "scontrol": '[[ "$1 $2 $3" == "show hostnames gpu-[07-08]" ]] && printf "gpu-07\\ngpu-08\\n"\n'
                '[[ $1 == requeue ]] && echo "scontrol $*" >> "$STUB_LOG"; true',
    "accelerate": 'printf accelerate; printf \'\\t%s\' "$@"; echo; echo "ACCELERATE_USE_CPU=$ACCELERATE_USE_CPU"',
    # Like a run's processes told to stop by `scancel --signal`: each saves, then exits 128 + the signal's number.
    "scancel": 'echo "scancel $*" >> "$STUB_LOG"; kill -"${1#--signal=}" $(cat "$STUB_LOG.pids")',
}


def with_stubs(tmp_path: Path, **env: str) -> dict[str, str]:
    """The environment of a script run against the stubs (written to tmp_path), outside any slurm job."""
    for name, body in STUBS.items():
        stub = tmp_path / name
        stub.write_text(f"#!/usr/bin/env bash\n{body}\n")
        stub.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ACCELERATE_", "GPUS_PER_NODE"))}
    clean["PATH"] = f"{tmp_path}{os.pathsep}{clean['PATH']}"
    return {**clean, "STUB_LOG": str(tmp_path / "log"), **env}


def run_with_stubs(tmp_path: Path, argv: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *argv], cwd=ROOT, env=with_stubs(tmp_path, **env), capture_output=True, text=True)


def launches(stdout: str) -> list[argparse.Namespace]:
    """The calls of the stub `accelerate`, each parsed by accelerate's own `accelerate launch` parser."""
    calls = [line.split("\t")[1:] for line in stdout.splitlines() if line.startswith("accelerate\t")]
    assert all(args[0] == "launch" for args in calls), calls
    return [launch_command_parser().parse_args(args[1:]) for args in calls]


SLURM_2_NODES = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu-[07-08]",
    "SLURM_NNODES": "2",
    "SLURM_NODEID": "0",  # the batch step runs on the first node
    "SLURM_GPUS_ON_NODE": "4",
    "SLURM_CPUS_PER_TASK": "32",
}
USER_ARGS = ["ppo", "recipes/ppo-demo.yaml", "train.learning_rate=1e-5", "actor.model.target_modules=[q_proj, v_proj]"]


def runs_lora_rl_with_user_args(launch: argparse.Namespace) -> bool:
    return launch.module and launch.training_script == "lora_rl" and launch.training_script_args == USER_ARGS


def test_sbatch_launches_one_accelerate_per_node(tmp_path):
    result = run_with_stubs(tmp_path, [str(SBATCH), *USER_ARGS], **SLURM_2_NODES)
    assert result.returncode == 0, result.stderr
    calls = launches(result.stdout)
    assert [launch.machine_rank for launch in calls] == [0, 1]  # read by each task, not once at submission
    for launch in calls:
        assert launch.config_file == "recipes/accelerate/multi_gpu.yaml"
        assert (launch.num_machines, launch.num_processes) == (2, 8)
        assert (launch.main_process_ip, launch.main_process_port) == ("gpu-07", 20000 + 4242)
        assert runs_lora_rl_with_user_args(launch)


def test_sbatch_settings(tmp_path):
    slurm = {**SLURM_2_NODES, "SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "h100:2"}
    result = run_with_stubs(tmp_path, [str(SBATCH), *USER_ARGS], ACCELERATE_CONFIG="recipes/accelerate/fsdp.yaml",
                            MASTER_PORT="29555", **slurm)  # fmt: skip
    assert result.returncode == 0, result.stderr
    for launch in launches(result.stdout):
        assert launch.config_file == "recipes/accelerate/fsdp.yaml"
        assert (launch.main_process_port, launch.num_processes) == (29555, 4)


def test_sbatch_lets_a_run_save_and_requeues_it_before_the_time_limit(tmp_path):
    """120 s before the time limit slurm sends the batch script SIGUSR1 (--signal=B:USR1@120): the script sends
    SIGTERM to the run's processes (scancel --signal), waits for them to save and stop, then requeues the job."""
    stopping_run = 'echo $$ >> "$STUB_LOG.pids"; trap "echo saved; exit 143" TERM; while :; do sleep 0.05; done'
    env = with_stubs(tmp_path, **{**SLURM_2_NODES, "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "gpu-07"})
    (tmp_path / "accelerate").write_text(f"#!/usr/bin/env bash\n{stopping_run}\n")
    (tmp_path / "scontrol").write_text('#!/usr/bin/env bash\n[[ $1 == show ]] && echo gpu-07\n'
                                       '[[ $1 == requeue ]] && echo "scontrol $*" >> "$STUB_LOG"; true\n')  # fmt: skip
    script = subprocess.Popen(["bash", str(SBATCH), *USER_ARGS], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    pids = tmp_path / "log.pids"
    deadline = time.monotonic() + 30
    while not (pids.exists() and pids.read_text().strip()):
        assert script.poll() is None and time.monotonic() < deadline, script.communicate()
        time.sleep(0.05)
    script.send_signal(signal.SIGUSR1)
    stdout, stderr = script.communicate(timeout=30)
    assert script.returncode == 143, stderr
    assert (tmp_path / "log").read_text() == "scancel --signal=TERM 4242\nscontrol requeue 4242\n"
    assert "saved" in stdout and "lora-rl: requeueing job 4242 (restart 1 of at most 20)" in stdout


@pytest.mark.parametrize(
    ("argv", "restarts", "expected"),
    [
        (USER_ARGS, "0", USER_ARGS),  # the first start: as the user said
        (USER_ARGS, "1", [*USER_ARGS, "--resume", "auto"]),  # requeued: continue
        ([*USER_ARGS, "--resume", "runs/x/checkpoint-4"], "2", [*USER_ARGS, "--resume", "runs/x/checkpoint-4"]),
    ],
)
def test_a_requeued_start_resumes(tmp_path, argv, restarts, expected):
    result = run_with_stubs(tmp_path, [str(SBATCH), *argv], **SLURM_2_NODES, SLURM_RESTART_COUNT=restarts)
    assert result.returncode == 0, result.stderr
    assert all(launch.training_script_args == expected for launch in launches(result.stdout))
    assert not (tmp_path / "log").exists()  # no signal: nothing stopped, nothing requeued


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["ppo"], SLURM_2_NODES, "usage: sbatch"),
        (USER_ARGS, {}, "error: not inside a slurm job"),
        (USER_ARGS, {**SLURM_2_NODES, "ACCELERATE_CONFIG": "nope.yaml"}, "error: accelerate config 'nope.yaml'"),
    ],
)
def test_sbatch_refuses(tmp_path, argv, env, message):
    result = run_with_stubs(tmp_path, [str(SBATCH), *argv], **env)
    assert result.returncode == 2
    assert message in result.stderr
    assert not launches(result.stdout)


@pytest.mark.parametrize("cpu", [False, True])
def test_multi_gpu_launcher(tmp_path, cpu):
    result = run_with_stubs(tmp_path, [str(LAUNCHER), *(["--cpu"] if cpu else []), "4", *USER_ARGS])
    assert result.returncode == 0, result.stderr
    [launch] = launches(result.stdout)
    assert (launch.config_file, launch.num_processes) == (str(CONFIG_DIR / "multi_gpu.yaml"), 4)
    assert not launch.cpu  # `accelerate launch --cpu` would start one process whatever --num_processes says
    assert runs_lora_rl_with_user_args(launch)
    # Instead ACCELERATE_USE_CPU=1 makes each of the N processes choose the CPU and gloo.
    assert f"ACCELERATE_USE_CPU={'1' if cpu else ''}\n" in result.stdout


@pytest.mark.parametrize("argv", [["4", "ppo"], ["four", "ppo", "recipes/ppo-demo.yaml"]])
def test_multi_gpu_launcher_refuses(tmp_path, argv):
    result = run_with_stubs(tmp_path, [str(LAUNCHER), *argv])
    assert result.returncode == 2
    assert "usage:" in result.stderr
    assert not launches(result.stdout)
