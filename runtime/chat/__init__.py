"""The chat protocol between text and tokens: prompts from messages, tools in and calls out, output
split into content, reasoning and tool calls, and the grammars that constrain it. Backend-neutral:
it runs the same on Metal, CUDA and the CPU."""
