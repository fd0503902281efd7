"""Tools a chat model can call (a calculator) and the loop that runs a model with them."""
