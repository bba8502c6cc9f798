"""Bad config files and command-line values: each a ConfigError naming the section.field (or the
file), the value and what is allowed, raised while the job config is parsed (before any rank
starts work). YAML values follow the rules of ``--set`` strings (``m6_engine.config.check_value``)."""

import re

import pytest

from m6_engine.config import ConfigError, job_config_from_dict, load_yaml


def _job(yaml_text: str, tmp_path, overrides=None):
    path = tmp_path / "job.yaml"
    path.write_text(yaml_text, encoding="utf-8")
    return job_config_from_dict(load_yaml(str(path)), overrides)


@pytest.mark.parametrize("yaml_text, message", [
    # the reported case: a string where an int is expected, as --tp two says it
    ("parallel: {tp: two}", "parallel.tp: ParallelConfig.tp expects int, got 'two'"),
    ("parallel: {tp: true}", "parallel.tp: ParallelConfig.tp expects int, got True"),   # bool is no int
    ("parallel: {pp: 2.5}", "parallel.pp: ParallelConfig.pp expects int, got 2.5"),
    ("parallel: {tp: [2]}", "parallel.tp: ParallelConfig.tp expects int, got [2]"),
    ("train: {micro_batch: null}", "train.micro_batch: TrainConfig.micro_batch expects int, got None"),
    ("train: {save_dir: 3}", "train.save_dir: TrainConfig.save_dir expects str, got 3"),
    ("optimizer: {lr: fast}", "optimizer.lr: OptimizerConfig.lr expects float, got 'fast'"),
    ("optimizer: {lr: false}", "optimizer.lr: OptimizerConfig.lr expects float, got False"),
    ("optimizer: {betas: [0.9]}", "optimizer.betas: OptimizerConfig.betas expects tuple[float, float], got [0.9]"),
    ("optimizer: {betas: 0.9}", "optimizer.betas: OptimizerConfig.betas expects tuple[float, float], got 0.9"),
    ("optimizer: {betas: [0.9, high]}", "optimizer.betas: OptimizerConfig.betas[1] expects float, got 'high'"),
    ("optimizer: {optimizer_sharding: maybe}",
     "optimizer.optimizer_sharding: OptimizerConfig.optimizer_sharding expects a boolean, got 'maybe'"),
    ("optimizer: {optimizer_sharding: 1}",
     "optimizer.optimizer_sharding: OptimizerConfig.optimizer_sharding expects a boolean, got 1"),
    ("data: {task_weights: [1, 2]}", "data.task_weights: DataConfig.task_weights expects a mapping, got [1, 2]"),
    ("model: {preset: tiny, hidden_size: big}", "model.hidden_size: ModelConfig.hidden_size expects int, got 'big'"),
    ("model: {num_layers: 2, hidden_size: 64, num_heads: four}",
     "model.num_heads: ModelConfig.num_heads expects int, got 'four'"),
    ("model: {preset: 7}", "model.preset expects one of ['m6-base', 'm6-large', 'tiny'], got 7"),
    ("model: {preset: huge}", "unknown model preset 'huge'; choose one of ['m6-base', 'm6-large', 'tiny']"),
    ("parallel: 2", "config section 'parallel' must be a mapping of field: value, got 2"),
    ("trian: {train_steps: 3}", "unknown config section(s) ['trian']; sections are"),
    ("train: {train_step: 3}", "section 'train': TrainConfig has no field 'train_step'; fields: ["),
    ("model: {preset: tiny, hidden: 64}", "section 'model': ModelConfig has no field 'hidden'"),
    ("parallel: {schedule: zigzag}", "ParallelConfig.schedule must be '1f1b' or 'gpipe', got 'zigzag'"),
    ("train: {recompute: some}", "TrainConfig.recompute must be one of ('none', 'selective', 'full'), got 'some'"),
    ("train: {profile_steps: '5'}", "TrainConfig.profile_steps must be 'a:b' with integers a < b, got '5'"),
    ("optimizer: {precision: fp8}", "OptimizerConfig.precision must be one of ['bf16', 'fp16', 'fp32'], got 'fp8'"),
    ("optimizer: {lr: 1.0e-3, min_lr: 1.0e-2}", "OptimizerConfig.min_lr must be in [0, lr = 0.001], got 0.01"),
    ("data: {exhausted: loop}", "DataConfig.exhausted must be one of ('wrap', 'stop'), got 'loop'"),
    ("data: {task_weights: {captioning: 1.0}}", "DataConfig.task_weights: unknown task"),
    ("data: {task_weights: {text_denoising: high}}",
     "data.task_weights: DataConfig.task_weights['text_denoising'] expects float, got 'high'"),
    ("data: {task_weights: {3: 1}}", "data.task_weights: DataConfig.task_weights key expects str, got 3"),
    ("model: {preset: tiny, hidden_size: 130}", "ModelConfig.num_heads = 4 must divide ModelConfig.hidden_size = 130"),
])
def test_bad_yaml_value_names_the_field_value_and_type(yaml_text, message, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _job(yaml_text, tmp_path)


def test_yaml_values_are_coerced_as_command_line_strings(tmp_path):
    job = _job("parallel: {tp: '2', timeout_s: 30}\noptimizer: {lr: 1, betas: [0, 0.5]}\n"
               "model: {preset: tiny, fused_kernels: 'off'}", tmp_path)
    assert job.parallel.tp == 2 and job.parallel.timeout_s == 30.0 and type(job.parallel.timeout_s) is float
    assert job.optimizer.lr == 1.0 and type(job.optimizer.lr) is float
    assert job.optimizer.betas == (0.0, 0.5) and job.model.fused_kernels is False
    assert _job("", tmp_path, {"optimizer.betas": "0.8, 0.95"}).optimizer.betas == (0.8, 0.95)


@pytest.mark.parametrize("model, message", [
    # values the fused ops and the initialisation take as they are: refused when the config is read,
    # not as NaN losses, a bare ValueError while the model is built or an IndexError in the embedding
    ("layernorm_eps: 0", "ModelConfig.layernorm_eps must be > 0, got 0.0"),
    ("layernorm_eps: -1.0e-5", "ModelConfig.layernorm_eps must be > 0, got -1e-05"),
    ("init_std: 0", "ModelConfig.init_std must be > 0, got 0.0"),
    ("num_segments: 2", "ModelConfig.num_segments must be 0 (no segment embedding) or >= 3 (M6 samples use "
                        "segments 0 image, 1 masked text, 2 complete text), got 2"),
    ("attention_dropout: 1.0", "ModelConfig.attention_dropout must be in [0, 1), got 1.0"),
    ("num_heads: 0", "ModelConfig.num_heads must be >= 1, got 0"),
])
def test_bad_op_argument_in_the_model_config(model, message, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _job(f"model: {{preset: tiny, {model}}}", tmp_path)


@pytest.mark.parametrize("overrides, message", [
    ({"parallel.tp": "two"}, "parallel.tp: ParallelConfig.tp expects int, got 'two'"),
    ({"train.micro_batch": "0"}, "TrainConfig.micro_batch must be >= 1, got 0"),
    ({"optimizer.betas": "0.9"}, "optimizer.betas: OptimizerConfig.betas expects tuple[float, float], got ['0.9']"),
    ({"model.fused_kernels": "perhaps"}, "model.fused_kernels: ModelConfig.fused_kernels expects a boolean, got 'perhaps'"),
    ({"train": "3"}, "override 'train' must be section.field"),
])
def test_bad_command_line_value(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _job("", tmp_path, overrides)


@pytest.mark.parametrize("content, message", [
    (None, "config file not found: {path}"),
    ("train: [unclosed", "config file {path} is not valid YAML"),
    ("- a\n- b\n", "config file {path} must hold a mapping at the top level, got list"),
])
def test_bad_config_file_names_the_file(content, message, tmp_path):
    path = tmp_path / "job.yaml"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(message.format(path=path))):
        load_yaml(str(path))
