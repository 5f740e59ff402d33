"""The launch scripts users start from: the env-var script trains (CPU, 2 ranks); the SLURM script launches it right."""

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, assert_ok
from test_train import checkpoints

SCRIPTS = ROOT / "scripts"


def test_env_var_script_trains_the_tiny_model_on_two_cpu_ranks(tiny_model, shards, tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
        "MODEL_NAME": tiny_model, "OUTPUT_DIR": "out", "SHARDS": shards, "MAX_STEPS": "4", "LR": "1e-4", "BS": "2",
        "PROMPT_DROPOUT": "0.5", "RESOLUTION": "64", "CONDITION_RESOLUTION": "16", "NUM_WORKERS": "1",
        "MIXED_PRECISION": "no", "REPORT_TO": "tensorboard", "VALIDATION_STEPS": "100", "CHECKPOINTING_STEPS": "2",
        "NUM_GPUS": "2", "MASTER_PORT": "0",
    }
    proc = subprocess.run([str(SCRIPTS / "train_laion.sh"), "--num_validation_images=1", "--num_holdout_samples=0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    proc.log = proc.stdout + proc.stderr
    assert_ok(proc)
    assert "Num processes: 2" in proc.log and "Total optimization steps = 4" in proc.log
    assert "Instantaneous batch size per device = 2" in proc.log
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"]  # OUTPUT_DIR is relative to where it was run
    assert (out / "diffusion_pytorch_model.safetensors").exists() and (out / "validation" / "final-000004.png").exists()


def test_slurm_script_parses_and_launches_the_elastic_reference_command(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPTS / "train_slurm.sbatch")]).returncode == 0
    env = {**os.environ, "DRY_RUN": "1", "SLURM_NNODES": "4", "SLURM_JOB_ID": "77", "MASTER_ADDR": "gpu-node-001",
           "OUTPUT_DIR": "/shared/tile", "LR": "3e-5", "BS": "16", "MAX_STEPS": "20000", "PROMPT_DROPOUT": "0.1",
           "SHARDS": "/data/laion/{00000..00099}.tar"}
    proc = subprocess.run(["bash", str(SCRIPTS / "train_slurm.sbatch"), "--seed=7"], env=env, capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    srun, launch = proc.stdout.strip().splitlines()
    assert srun.startswith("srun --nodes=4 --ntasks-per-node=1") and "MACHINE_RANK=\\$SLURM_NODEID" in srun
    text = (SCRIPTS / "train_slurm.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@120" in text and "#SBATCH --requeue" in text and "scontrol requeue" in text
    expected = [
        "scripts/preemptible.sh accelerate launch --multi_gpu --num_machines 4 --num_processes 32 --machine_rank 0",
        "--main_process_ip gpu-node-001", "--rdzv_backend c10d --max_restarts 3", "--mixed_precision=fp16",
        "--output_dir=/shared/tile", "--learning_rate=3e-5", "--train_batch_size=16", "--max_train_steps=20000",
        "--proportion_empty_prompts 0.1", "--resume_from_checkpoint=latest", "--use_8bit_adam", "--seed=7",
        "--enable_xformers_memory_efficient_attention", "--gradient_checkpointing", "--report_to=wandb",
    ]
    for piece in expected:
        assert piece in launch.replace("\\", ""), piece
    assert re.search(r"--train_shards_path_or_url=/data/laion/\\?\{00000..00099\\?\}.tar", launch)


def test_scripts_take_an_sdxl_model_name_and_its_flags(tmp_path):
    """README's SDXL command through the SLURM script: MODEL_NAME, the resolutions and extra flags reach the trainer,
    which reads the family from the base itself (nothing in the scripts is SD-1.x-only)."""
    env = {**os.environ, "DRY_RUN": "1", "SLURM_NNODES": "2", "MASTER_ADDR": "gpu-node-001",
           "MODEL_NAME": "stabilityai/stable-diffusion-xl-base-1.0", "RESOLUTION": "1024", "CONDITION_RESOLUTION": "256",
           "BS": "4", "GRAD_ACCUM": "4", "PROMPT_DROPOUT": "0.5"}
    extra = ["--pretrained_vae_model_name_or_path=madebyollin/sdxl-vae-fp16-fix", "--condition_scales", "2", "3", "4"]
    proc = subprocess.run(["bash", str(SCRIPTS / "train_slurm.sbatch"), *extra], env=env, capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    launch = proc.stdout.strip().splitlines()[1].replace("\\", "")
    for piece in ["--pretrained_model_name_or_path=stabilityai/stable-diffusion-xl-base-1.0", "--resolution=1024",
                  "--condition_resolution=256", "--train_batch_size=4", "--gradient_accumulation_steps=4",
                  "--proportion_empty_prompts 0.5", "--num_processes 16", " ".join(extra)]:
        assert piece in launch, piece
