"""The multimodal Thinker (Qwen2.5-Omni layout): audio and vision encoders, TMRoPE positions, the decoder that
reads them, and checkpoint interop with transformers."""
