"""Export of model folders to other runtimes' formats (GGUF for llama.cpp)."""
