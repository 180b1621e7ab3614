"""The `turboquant` command line on tiny offline models: output, exit codes, one-line errors."""

import json

import pytest

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from turboquant.cli import main  # noqa: E402

WORDS = "the a of to and in is it that was for on are with as be at by this have from or one had not but".split()


VOCAB = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}


def save_with_tokenizer(model, directory) -> str:
    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def save_tiny_llama(directory):
    config = transformers.LlamaConfig(vocab_size=len(VOCAB), hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, eos_token_id=1)
    return save_with_tokenizer(transformers.LlamaForCausalLM(config), directory)


def test_verify_prints_a_per_layer_report(tmp_path, capsys):
    model_dir = save_tiny_llama(tmp_path / "llama")
    status = main(["verify", "--model", model_dir, "--prefill", "40", "--decode-tokens", "8", "--window", "4", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert status in (0, 1) and report["passed"] == (status == 0)
    assert [layer["layer"] for layer in report["layers"]] == [0, 1]
    # below 1: the cosines are measured on the compressed tokens (8-bit boundary layers, 2 of 2 here, included)
    assert all(0.9 < layer["key_cosine"] < 1.0 and 0.9 < layer["value_cosine"] < 1.0 for layer in report["layers"])
    assert report["tokens"] == {"prefill": 40, "decode": 8}
    assert report["kv_bytes"] < report["dynamic_kv_bytes"]


def test_verify_reads_vision_language_and_cross_attention_models(tmp_path, capsys):
    """A vision-language checkpoint runs its language tower on the text; Mllama's cross-attention layer
    is reported uncompressed, with the reason."""
    text = dict(vocab_size=len(VOCAB), hidden_size=128, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=2, num_key_value_heads=1, head_dim=64, eos_token_id=1, pad_token_id=0)
    llava = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        text_config=transformers.LlamaConfig(**text),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=16)))
    mllama = transformers.MllamaForCausalLM(transformers.MllamaTextConfig(
        **{k: v for k, v in text.items() if k != "head_dim"}, cross_attention_layers=[1]))
    for name, model in (("llava", llava), ("mllama", mllama)):
        model_dir = save_with_tokenizer(model, tmp_path / name)
        assert main(["verify", "--model", model_dir, "--prefill", "40", "--decode-tokens", "8", "--window", "4",
                     "--json"]) in (0, 1)
        report = json.loads(capsys.readouterr().out)
        statuses = [layer["status"] for layer in report["layers"]]
        assert statuses == (["compressed"] * 3 if name == "llava"
                            else ["compressed", "cross-attention: uncompressed", "compressed"])
        assert all(layer["key_cosine"] is None for layer in report["layers"] if layer["status"] != "compressed")


def test_generate_compare_prints_both_runs(tmp_path, capsys):
    model_dir = save_tiny_llama(tmp_path / "llama")
    assert main(["generate", "--model", model_dir, "--compare", "--max-new-tokens", "5", "the a of"]) == 0
    out = capsys.readouterr().out
    assert "DynamicCache" in out and "turboquant k4v4" in out and "tokens/s" in out
    assert "nothing is compressed yet" in out  # 8 tokens, all inside the full-precision window
    assert main(["generate", "--model", model_dir, "--window", "2", "--sinks", "0", "--max-new-tokens", "5",
                 "the a of"]) == 0
    assert "nothing is compressed yet" not in capsys.readouterr().out


def test_missing_model_is_one_line_error(capsys):
    assert main(["verify", "--model", "./no/such/dir"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("turboquant: error: model './no/such/dir': no such file") and err.count("\n") == 1


def test_encoder_only_model_is_refused(tmp_path, capsys):
    config = transformers.BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    assert main(["verify", "--model", str(tmp_path / "bert")]) == 2
    assert "not a decoder-only causal LM" in capsys.readouterr().err


def test_unknown_preset_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", "--preset", "k5v5"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_help_explains_every_command(capsys):
    for command in ("verify", "generate", "presets", "demo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "usage: turboquant " + command in capsys.readouterr().out


def test_presets_table(capsys):
    assert main(["presets", "--head-dim", "64", "--tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "k4v4" in out and "k3v3" in out


def test_compress_weights_writes_a_checkpoint_the_other_commands_load(tmp_path, capsys):
    model_dir = save_tiny_llama(tmp_path / "llama")
    out = tmp_path / "tq3"
    assert main(["compress-weights", "--model", model_dir, "--bits", "3", "--group-size", "64", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["generate", "--model", str(out), "--max-new-tokens", "4", "the cat"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    assert main(["compress-weights", "--model", model_dir, "--group-size", "64", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["compress-weights", "--model", model_dir, "--bits", "5", "--out", str(tmp_path / "x")]) == 2
    assert "bits must be one of" in capsys.readouterr().err
    # the kurtosis rule: a tiny random model has Gaussian weights, so every layer keeps --bits
    assert main(["compress-weights", "--model", model_dir, "--bits", "3", "--group-size", "64", "--heavy-tail",
                 "--out", str(tmp_path / "kt")]) == 0
    assert "heavy-tailed tensors at other bits: none" in capsys.readouterr().out
