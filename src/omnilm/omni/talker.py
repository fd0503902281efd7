"""The Talker: Qwen2.5-Omni's second decoder, which reads the Thinker's reply and writes speech codec tokens.

Written for this project; composition again, not a new decoder. The Talker is omnilm's decoder (Qwen2 blocks,
TMRoPE) between a projection and a codec head:

    row (Thinker width E) ──thinker_to_talker_proj──▶ decoder (width d, 3-D rotary positions) ──codec head──▶ logits

What a row is (one reply, transformers' ``Qwen2_5OmniForConditionalGeneration.generate`` recipe):

- prompt rows, one per prompt token: the Thinker's last hidden state + the token's input embedding (zero at the
  audio / image / video placeholders, so media enter through the hidden states only); then the speaker's
  text-start embedding; then the first reply token's vector (hidden state + embedding). The Talker itself adds
  the codec *pad* embedding to the second-to-last prompt row and the codec *start* embedding to the last one:
  that is the cue to start speaking, and the codec logits of the last row give the first code.
- then one row per step, on two tracks: the embedding of the code just produced + the next vector of the reply
  track. The reply track holds the vectors of the reply tokens after the first, then the text-end embedding, then
  the text-pad embedding, repeated for as long as speech goes on.

The prompt rows are TMRoPE-positioned like the Thinker's prompt (:mod:`omnilm.omni.positions`, with the Talker's
own copy of the media token ids), the two extra rows as text; every step continues one past the largest id.

The codec embedding has the Thinker's width E (codes are added to Thinker vectors before the projection), so the
decoder's token table is swapped for one of that width and the decoder only ever receives projected rows.

Checkpoints: transformers' ``Qwen2_5OmniTalkerForConditionalGeneration`` layout (``config.json`` of model_type
``qwen2_5_omni_talker``; tensors ``thinker_to_talker_proj.*``, ``model.*``, ``codec_head.weight``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omnilm.config import ConfigError
from omnilm.infer.generate import make_generator
from omnilm.infer.sampling import SamplingParams, next_token
from omnilm.model.attention import KVCache
from omnilm.model.config import ModelConfig
from omnilm.model.hf import (
    check_tensors,
    config_to_hf,
    read_config_json,
    read_hf_tensors,
    state_from_hf,
    state_to_hf,
    write_weights,
)
from omnilm.model.transformer import Transformer
from omnilm.omni.config import ThinkerConfig, VisionEncoderConfig, text_config_from_hf
from omnilm.omni.positions import decode_positions, rope_index
from omnilm.omni.thinker import Thinker
from omnilm.utils.atomic import write_json_atomic

# ---------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class TalkerConfig:
    """The Talker: decoder + the Thinker's width + the ids it reads and writes (transformers'
    ``Qwen2_5OmniTalkerConfig``; the defaults are Qwen2.5-Omni-7B's ids, the decoder is a small one)."""

    #: The decoder; its vocabulary is the codec's (codes the Talker writes), its width the Talker's own.
    text: ModelConfig = field(default_factory=lambda: ModelConfig(
        family="qwen2", vocab_size=8448, n_layer=2, n_head=4, n_kv_head=2, d_model=128, mrope_section=(4, 6, 6),
        tie_embeddings=False))
    #: Width of the Thinker's vectors (its d_model), which the rows and the codec embedding have.
    embedding_size: int = 128
    #: Codec ids: start of speech, end of speech, padding, and the filler standing for the prompt's rows.
    tts_codec_start_token_id: int = 8293
    tts_codec_end_token_id: int = 8294
    tts_codec_pad_token_id: int = 8292
    tts_codec_mask_token_id: int = 8296
    #: Thinker text ids on the reply track: start (a speaker's own replaces it), end and padding.
    tts_text_start_token_id: int = 151860
    tts_text_end_token_id: int = 151861
    tts_text_pad_token_id: int = 151859
    #: Thinker media ids, for the TMRoPE positions of the prompt rows.
    audio_token_id: int = 151646
    image_token_id: int = 151655
    video_token_id: int = 151656
    audio_start_token_id: int = 151647
    audio_end_token_id: int = 151648
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    position_id_per_seconds: int = 25
    seconds_per_chunk: int = 2
    spatial_merge_size: int = 2

    def __post_init__(self) -> None:
        if self.text.mrope_section is None:
            raise ConfigError("the Talker's decoder needs mrope_section (its rotary dimension split in 3)")
        if self.text.tie_embeddings:
            raise ConfigError("the Talker's codec head cannot share the codec embedding (tie_embeddings)")
        codec = {name: getattr(self, name) for name in CODEC_TOKEN_FIELDS}
        outside = {name: value for name, value in codec.items() if not 0 <= value < self.text.vocab_size}
        if outside:
            raise ConfigError(f"codec ids {outside} are outside the codec vocabulary of {self.text.vocab_size}")

    @property
    def end_codes(self) -> tuple[int, int]:
        """Codes that end speech: Qwen2.5-Omni stops on codec pad as well as on codec end."""
        return self.tts_codec_pad_token_id, self.tts_codec_end_token_id


CODEC_TOKEN_FIELDS = ("tts_codec_start_token_id", "tts_codec_end_token_id", "tts_codec_pad_token_id",
                      "tts_codec_mask_token_id")
_HF_FIELDS = CODEC_TOKEN_FIELDS + (
    "tts_text_start_token_id", "tts_text_end_token_id", "tts_text_pad_token_id", "audio_token_id", "image_token_id",
    "video_token_id", "audio_start_token_id", "audio_end_token_id", "vision_start_token_id", "vision_end_token_id",
    "position_id_per_seconds", "seconds_per_chunk", "spatial_merge_size")
# transformers spells three of them "..._index" in config.json.
_HF_NAMES = {"audio_token_id": "audio_token_index", "image_token_id": "image_token_index",
             "video_token_id": "video_token_index"}
# transformers' talker uses these rotary settings when config.json leaves them out.
_HF_DEFAULT_THETA = 1_000_000.0
_HF_DEFAULT_MROPE = [16, 24, 24]


def talker_config_to_hf(config: TalkerConfig) -> dict[str, Any]:
    """``config.json`` of ``Qwen2_5OmniTalkerForConditionalGeneration`` for ``config`` (one flat mapping)."""
    out = config_to_hf(config.text)
    out |= {"architectures": ["Qwen2_5OmniTalkerForConditionalGeneration"], "model_type": "qwen2_5_omni_talker",
            "embedding_size": config.embedding_size}
    for name in _HF_FIELDS:
        out[_HF_NAMES.get(name, name)] = getattr(config, name)
    return out


def talker_config_from_hf(hf: dict[str, Any], source: str = "config.json") -> TalkerConfig:
    """A TalkerConfig from a transformers talker ``config.json`` (or the ``talker_config`` of a full one)."""
    if hf.get("model_type") == "qwen2_5_omni":
        hf = hf["talker_config"]
    if hf.get("model_type") != "qwen2_5_omni_talker":
        raise ConfigError(f"{source}: model_type {hf.get('model_type')!r} is not a Qwen2.5-Omni talker")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hf.get("rope_theta", _HF_DEFAULT_THETA))
    rope.setdefault("mrope_section", _HF_DEFAULT_MROPE)
    text_hf = dict(hf) | {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "rope_parameters": rope,
                          "tie_word_embeddings": hf.get("tie_word_embeddings", False)}
    text_hf.pop("rope_scaling", None)
    text = text_config_from_hf(text_hf, source=source)
    ids = {name: hf[_HF_NAMES.get(name, name)] for name in _HF_FIELDS if _HF_NAMES.get(name, name) in hf}
    return TalkerConfig(text=text, embedding_size=hf.get("embedding_size", text.d_model), **ids)


def _positions_view(config: TalkerConfig) -> ThinkerConfig:
    """A ThinkerConfig carrying the Talker's media ids and timing: all that ``rope_index`` reads of it."""
    return ThinkerConfig(vision=VisionEncoderConfig(spatial_merge_size=config.spatial_merge_size),
                         audio_token_id=config.audio_token_id, image_token_id=config.image_token_id,
                         video_token_id=config.video_token_id, audio_start_token_id=config.audio_start_token_id,
                         audio_end_token_id=config.audio_end_token_id,
                         vision_start_token_id=config.vision_start_token_id,
                         vision_end_token_id=config.vision_end_token_id,
                         position_id_per_seconds=config.position_id_per_seconds,
                         seconds_per_chunk=config.seconds_per_chunk)


def prompt_positions(config: TalkerConfig, input_text_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                     audio_feature_lengths: torch.Tensor | None = None,
                     video_second_per_grid: torch.Tensor | None = None,
                     use_audio_in_video: bool = False) -> torch.Tensor:
    """TMRoPE ids (3, B, T) of the Talker's prompt rows, from the Thinker ids the rows stand for (the prompt, the
    speaker's text-start id, the first reply token), counted with the Talker's own media ids."""
    positions, _ = rope_index(input_text_ids, _positions_view(config), attention_mask, image_grid_thw,
                              video_grid_thw, audio_feature_lengths, video_second_per_grid, use_audio_in_video)
    return positions


# ---------------------------------------------------------------------------------------------
# model


class Talker(nn.Module):
    """Projection + decoder + codec head; see the module docstring."""

    def __init__(self, config: TalkerConfig) -> None:
        super().__init__()
        self.config = config
        self.thinker_to_talker_proj = nn.Linear(config.embedding_size, config.text.d_model)
        self.decoder = Transformer(config.text)
        # Codes are embedded at the Thinker's width, to be added to Thinker vectors before the projection.
        self.decoder.tok_emb = nn.Embedding(config.text.vocab_size, config.embedding_size)
        nn.init.normal_(self.decoder.tok_emb.weight, std=config.text.init_std)
        nn.init.normal_(self.thinker_to_talker_proj.weight, std=config.text.init_std)
        nn.init.zeros_(self.thinker_to_talker_proj.bias)

    @property
    def codec_embedding(self) -> nn.Embedding:
        return self.decoder.tok_emb

    @property
    def codec_head(self) -> nn.Linear:
        return self.decoder.lm_head

    def prompt_rows(self, prompt: torch.Tensor) -> torch.Tensor:
        """``prompt`` (B, P, E) with the codec pad and codec start embeddings added to its last two rows."""
        if prompt.shape[1] < 2:
            raise ValueError("a Talker prompt has at least two rows (text start, first reply token)")
        cue = self.codec_embedding(torch.tensor([self.config.tts_codec_pad_token_id,
                                                 self.config.tts_codec_start_token_id], device=prompt.device))
        return torch.cat([prompt[:, :-2], prompt[:, -2:] + cue.to(prompt.dtype)], dim=1)

    def step_rows(self, codes: torch.Tensor, reply: torch.Tensor) -> torch.Tensor:
        """Rows (B, N, E) of N decoding steps: the embeddings of ``codes`` (B, N) + the reply track ``reply``."""
        if reply.shape[:2] != codes.shape:
            raise ValueError(f"{tuple(codes.shape)} codes need reply vectors of shape (B, N, E), got "
                             f"{tuple(reply.shape)}")
        return self.codec_embedding(codes) + reply

    def forward(self, prompt: torch.Tensor | None = None, codes: torch.Tensor | None = None,
                reply: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Codec logits (B, T, codec vocab), float32, of the prompt rows then the step rows.

        ``prompt`` (B, P, E): prompt rows without the codec cue (added here). ``codes`` (B, N) with ``reply``
        (B, N, E): step rows (teacher forcing, or one step of decoding after a cached prompt). ``position_ids``
        (3, B, T) should come from :func:`prompt_positions` / :meth:`TalkerInputs.positions` when the prompt holds
        media; None counts plain positions on from the cache. ``attention_mask`` (B, past+T) marks left padding.
        """
        parts = []
        if prompt is not None:
            parts.append(self.prompt_rows(prompt))
        if codes is not None:
            if reply is None:
                raise ValueError("codes need their reply-track vectors")
            parts.append(self.step_rows(codes, reply))
        if not parts:
            raise ValueError("pass a prompt, codes with reply vectors, or both")
        rows = torch.cat(parts, dim=1)  # (B, T, E)
        h = self.decoder.hidden_states(None, attention_mask, position_ids, cache,
                                       inputs_embeds=self.thinker_to_talker_proj(rows))  # (B, T, d)
        return self.codec_head(h[:, -1:] if last_only else h).float()

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache of ``max_len`` positions on this model's device and dtype."""
        p = self.codec_head.weight
        return KVCache(self.config.text, batch_size, max_len, p.device, p.dtype)


# ---------------------------------------------------------------------------------------------
# inputs from the Thinker


@dataclass(frozen=True)
class TalkerInputs:
    """The Talker's view of one reply (batch of one); build it with :func:`talker_inputs`."""

    #: (1, P, E) prompt rows, the codec cue not yet added (the Talker adds it).
    prompt: torch.Tensor
    #: (3, 1, P) TMRoPE ids of the prompt rows.
    position_ids: torch.Tensor
    #: (1, R, E) the reply track: vectors of the reply tokens after the first, text end, text pad. Step i reads
    #: row i, and the last row (padding) once the track has run out.
    reply: torch.Tensor

    def reply_rows(self, start: int, count: int) -> torch.Tensor:
        """Rows ``start .. start+count-1`` of the reply track (1, count, E), padding repeated past its end."""
        index = torch.arange(start, start + count, device=self.reply.device).clamp(max=self.reply.shape[1] - 1)
        return self.reply[:, index]

    def positions(self, steps: int = 0) -> torch.Tensor:
        """(3, 1, P + steps) ids of the prompt rows and then ``steps`` step rows, each one past the largest id."""
        length = self.position_ids.shape[-1]
        delta = self.position_ids.amax(dim=(0, 2)).view(-1, 1) + 1 - length  # (1, 1)
        return torch.cat([self.position_ids, decode_positions(delta, length, steps)], dim=-1)


_THINKER_MEDIA_ARGS = ("input_features", "feature_attention_mask", "pixel_values", "image_grid_thw",
                       "pixel_values_videos", "video_grid_thw", "video_second_per_grid", "use_audio_in_video")


@torch.no_grad()
def talker_inputs(thinker: Thinker, config: TalkerConfig, input_ids: torch.Tensor,
                  reply_ids: torch.Tensor | Sequence[int], speaker_bos_id: int, eos_ids: Sequence[int] = (),
                  hidden: torch.Tensor | None = None, **media: Any) -> TalkerInputs:
    """The Talker's prompt rows, positions and reply track for one reply of ``thinker``.

    ``input_ids`` (1, P) is the Thinker's prompt and ``media`` its media arguments (``Thinker.forward``'s names);
    ``reply_ids`` are the tokens the Thinker generated after it (at least two). The reply is read up to its first
    ``eos_ids`` token; as in transformers, a reply without one loses its last token. ``speaker_bos_id`` is the
    speaker's text-start token (a Qwen2.5-Omni speaker's ``bos_token``). ``hidden`` (1, P + n, d), the Thinker's
    final hidden states over prompt and reply, spares a Thinker forward when the caller has them.
    """
    unknown = sorted(set(media) - set(_THINKER_MEDIA_ARGS))
    if unknown:
        raise TypeError(f"unknown media argument(s) {unknown}")
    ids = input_ids.view(1, -1)
    reply = torch.as_tensor(reply_ids, dtype=torch.long, device=ids.device).view(1, -1)
    if reply.shape[1] < 2:
        raise ValueError("the Talker reads replies of at least two tokens")
    prompt_len = ids.shape[1]
    ends = torch.isin(reply[0], torch.tensor(list(eos_ids), dtype=torch.long, device=ids.device)).nonzero()
    first_end = int(ends[0, 0]) if len(ends) else reply.shape[1]
    spoken = min(max(first_end, 1), reply.shape[1] - 1)  # reply tokens 0 .. spoken-1 are read out
    sequence = torch.cat([ids, reply[:, :spoken]], dim=1)  # (1, P + spoken)
    if hidden is None:
        hidden = thinker.hidden_states(sequence, **media)
    elif hidden.shape[1] < sequence.shape[1]:
        raise ValueError(f"hidden states cover {hidden.shape[1]} positions; {sequence.shape[1]} are needed")
    embed = thinker.decoder.tok_emb
    embeddings = embed(sequence)  # (1, P + spoken, E)
    c = thinker.config
    media_rows = torch.isin(sequence, torch.tensor([c.audio_token_id, c.image_token_id, c.video_token_id],
                                                   device=ids.device))
    vectors = hidden[:, :sequence.shape[1]] + embeddings.masked_fill(media_rows[..., None], 0.0)

    def text(token: int) -> torch.Tensor:  # (1, 1, E): a text id's Thinker embedding, with no hidden state
        return embed(torch.tensor([[token]], device=ids.device))

    prompt = torch.cat([vectors[:, :prompt_len], text(speaker_bos_id), vectors[:, prompt_len:prompt_len + 1]], 1)
    track = torch.cat([vectors[:, prompt_len + 1:], text(config.tts_text_end_token_id),
                       text(config.tts_text_pad_token_id)], dim=1)
    text_ids = torch.cat([ids, torch.full_like(ids[:, :1], speaker_bos_id), reply[:, :1]], dim=1)  # (1, P + 2)
    lengths = media.get("feature_attention_mask")
    positions = prompt_positions(config, text_ids, None, media.get("image_grid_thw"), media.get("video_grid_thw"),
                                 None if lengths is None else lengths.sum(-1), media.get("video_second_per_grid"),
                                 bool(media.get("use_audio_in_video", False)))
    return TalkerInputs(prompt=prompt, position_ids=positions, reply=track)


# ---------------------------------------------------------------------------------------------
# generation

#: Qwen2.5-Omni's sampling of codes.
TALKER_SAMPLING = SamplingParams(max_new_tokens=4096, temperature=0.9, top_k=40, top_p=0.8, repetition_penalty=1.05)


@torch.inference_mode()
def generate_codes(talker: Talker, inputs: TalkerInputs, params: SamplingParams = TALKER_SAMPLING,
                   end_codes: Sequence[int] | None = None) -> Iterator[int]:
    """Yield the codec ids of one reply's speech one at a time, with a KV cache, until an end code (not yielded;
    codec pad and codec end by default) or ``params.max_new_tokens`` codes.

    As in transformers: codec start is never chosen, and the repetition penalty counts the prompt's codec ids
    (codec mask, pad and start) as already present. The prompt always gets the codec cue and its TMRoPE ids, as
    the talker's forward in transformers gives them when it has an attention mask (transformers 5's ``generate``
    drops an all-ones mask, and its talker then silently skips both).
    """
    c = talker.config
    end = set(c.end_codes if end_codes is None else end_codes)
    prompt = inputs.prompt.to(talker.codec_head.weight.dtype)
    positions = inputs.positions(params.max_new_tokens)
    length = prompt.shape[1]
    cache = talker.new_cache(1, length + params.max_new_tokens)
    logits = talker(prompt, position_ids=positions[..., :length], cache=cache, last_only=True)[:, -1]  # (1, V)
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[0, [c.tts_codec_mask_token_id, c.tts_codec_pad_token_id, c.tts_codec_start_token_id]] = True
    generator = make_generator(params.seed, logits.device)
    for step in range(params.max_new_tokens):
        logits[:, c.tts_codec_start_token_id] = float("-inf")
        code = int(next_token(logits, params, seen, generator)[0])
        if code in end:
            return
        yield code
        if step == params.max_new_tokens - 1:
            return
        seen[0, code] = True
        at = length + step
        logits = talker(codes=torch.tensor([[code]], device=logits.device),
                        reply=inputs.reply_rows(step, 1).to(prompt.dtype), position_ids=positions[..., at:at + 1],
                        cache=cache)[:, -1]


# ---------------------------------------------------------------------------------------------
# checkpoints

_PROJ = "thinker_to_talker_proj."


def talker_state_to_hf(talker: Talker, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The Talker's tensors (or ``state``, with this module's names) under transformers' names."""
    state = {k: v.detach() for k, v in (talker.state_dict() if state is None else state).items()}
    decoder = {k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")}
    out = state_to_hf(talker.decoder, decoder)
    out["codec_head.weight"] = out.pop("lm_head.weight")
    return out | {k: v.contiguous() for k, v in state.items() if k.startswith(_PROJ)}


def save_talker(talker: Talker, folder: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``talker`` as a transformers talker folder (config.json and safetensors, each written atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = talker_state_to_hf(talker, state)
    write_weights(folder, tensors)
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    write_json_atomic(folder / "config.json", talker_config_to_hf(talker.config) | {"dtype": dtype})
    return folder


def read_talker_config(folder: str | Path) -> TalkerConfig:
    hf, source = read_config_json(folder)
    return talker_config_from_hf(hf, source=source)


def _talker_state(folder: str | Path, config: TalkerConfig) -> dict[str, torch.Tensor]:
    """A talker folder's tensors (or a whole Qwen2.5-Omni's ``talker.*``) under the Talker's parameter names."""
    tensors = read_hf_tensors(folder)
    if any(name.startswith("talker.") for name in tensors):
        tensors = {name[len("talker."):]: t for name, t in tensors.items() if name.startswith("talker.")}
    proj = {name: t for name, t in tensors.items() if name.startswith(_PROJ)}
    decoder = {("lm_head.weight" if name == "codec_head.weight" else name): t for name, t in tensors.items()
               if not name.startswith(_PROJ)}
    return proj | {f"decoder.{k}": v for k, v in state_from_hf(decoder, config.text).items()}


def load_talker(folder: str | Path, dtype: torch.dtype | None = None) -> Talker:
    """A Talker from a talker folder (omnilm's or transformers', or a whole Qwen2.5-Omni's); every tensor is
    checked by name and shape."""
    config = read_talker_config(folder)
    with torch.device("meta"):
        talker = Talker(config)
    state = _talker_state(folder, config)
    check_tensors(folder, state, {k: v.shape for k, v in talker.state_dict().items()})
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    talker.load_state_dict(state, assign=True)
    return talker.eval()
