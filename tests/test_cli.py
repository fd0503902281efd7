"""The ``omnilm`` command, run as a real subprocess."""

import subprocess
import sys

from omnilm.infer import SamplingParams, TextGenerator


def omnilm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omnilm.cli", *args], capture_output=True, timeout=120)


def test_help_lists_the_verbs():
    out = omnilm("--help")
    assert out.returncode == 0
    for verb in ("generate", "run", "init", "info"):
        assert verb in out.stdout.decode()


def test_generate_prints_only_the_continuation(model_dir):
    prompt = "Alice was born in"
    out = omnilm("generate", "--model", str(model_dir), "--prompt", prompt, "--temperature", "0",
                 "--max-new-tokens", "20")
    assert out.returncode == 0, out.stderr.decode()
    expected = TextGenerator.from_pretrained(model_dir).generate(prompt, SamplingParams(temperature=0,
                                                                                       max_new_tokens=20))[0]
    assert out.stdout.decode() == expected and expected


def test_generate_with_sampling_options_stop_and_seed(model_dir):
    args = ["generate", "--model", str(model_dir), "--prompt", "Bob", "--temperature", "0.8", "--top-k", "20",
            "--top-p", "0.9", "--min-p", "0.01", "--repetition-penalty", "1.1", "--seed", "7",
            "--max-new-tokens", "16"]
    first, second = omnilm(*args), omnilm(*args)
    assert first.returncode == 0 and first.stdout == second.stdout
    text = first.stdout.decode()
    assert len(text) > 4
    stopped = omnilm(*args, "--stop", text[2:4])
    assert stopped.stdout.decode() == text[: text.index(text[2:4])]
    beams = omnilm("generate", "--model", str(model_dir), "--prompt", "Bob", "--num-beams", "2",
                   "--max-new-tokens", "6")
    assert beams.returncode == 0


def test_errors_are_clear_and_exit_nonzero(tmp_path, model_dir):
    out = omnilm("generate", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert out.returncode == 2 and b"model folder not found" in out.stderr
    out = omnilm("generate", "--model", str(model_dir), "--prompt", "x", "--temperature", "-1")
    assert out.returncode == 2 and b"temperature" in out.stderr


def test_init_and_info(tmp_path, tokenizer):
    tokenizer.save(tmp_path / "tok")
    out = omnilm("init", "--preset", "tiny", "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "m"))
    assert out.returncode == 0, out.stderr.decode()
    info = omnilm("info", "--model", str(tmp_path / "m")).stdout.decode()
    assert "llama" in info and f"vocab {tokenizer.vocab_size}" in info
    assert (tmp_path / "m" / "tokenizer.json").is_file()


def test_generate_with_a_draft_model_matches_plain_greedy(model_dir):
    # The target itself as draft: every proposal is accepted, and the text must not change.
    plain = ["generate", "--model", str(model_dir), "--prompt", "Bob was", "--temperature", "0",
             "--max-new-tokens", "20"]
    out = omnilm(*plain, "--draft-model", str(model_dir), "--speculative-k", "3")
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == omnilm(*plain).stdout
