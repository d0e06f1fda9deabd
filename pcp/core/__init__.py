"""The pure run lifecycle: messages, state, decide(). No I/O, no clock, no cloud library."""
