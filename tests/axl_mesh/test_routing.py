"""model: "auto" routing: clear requests go to the obvious specialist, missing ones fall back."""

import pytest

from axl_mesh.routing import choose_specialist, looks_like_code

ALL = {"coder", "debugger", "fixer", "refactor", "testgen", "docs", "comment", "secure", "chat", "reasoning",
       "translate"}

TRACEBACK = """Traceback (most recent call last):
  File "app.py", line 3, in <module>
    print(items[3])
IndexError: list index out of range"""

CODE = "def total(xs):\n    s = 0\n    for x in xs:\n        s += x\n    return s\n"


@pytest.mark.parametrize("text, expected", [
    (TRACEBACK, "debugger"),
    ("My script crashes with this error:\nKeyError: 'name'", "debugger"),
    ("write tests for this:\n" + CODE, "testgen"),
    ("Can you give me pytest cases for my parser?", "testgen"),
    ("Add a docstring to this function\n" + CODE, "docs"),
    ("please comment this code\n" + CODE, "comment"),
    ("refactor this\n" + CODE, "refactor"),
    ("Can you clean up this function?\n" + CODE, "refactor"),
    ("Is this vulnerable to shell injection? os.system('ls ' + name)", "secure"),
    ("Translate this function to Rust\n" + CODE, "translate"),
    ("Explain step by step how merge sort works", "reasoning"),
    ("Why is my list comprehension slower than map?", "reasoning"),
    ("What is the difference between a list and a tuple?", "chat"),
    ("Hello! How are you today?", "chat"),
    ("Write a function that reverses a linked list", "coder"),
    (CODE, "coder"),
    ("fix this:\n" + CODE, "fixer"),
])
def test_clear_requests(text, expected):
    name, reason = choose_specialist(text, ALL)
    assert name == expected, reason
    assert reason.startswith(expected + ":")


def test_messages_use_the_last_user_turn():
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Write a function that adds two numbers"},
        {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
        {"role": "user", "content": "Now write unit tests for it"},
    ]
    assert choose_specialist(messages, ALL)[0] == "testgen"


def test_falls_back_to_an_available_specialist_and_says_so():
    name, reason = choose_specialist(TRACEBACK, {"coder", "chat"})
    assert name == "coder"
    assert "debugger is not available" in reason
    name, reason = choose_specialist("How are you?", {"translate"})
    assert name == "translate" and "not available" in reason
    with pytest.raises(ValueError, match="no specialist"):
        choose_specialist("hi", set())


def test_code_detection():
    assert looks_like_code(CODE)
    assert looks_like_code("```\nx = 1\n```")
    assert looks_like_code("int main() {\n  return 0;\n}")
    assert not looks_like_code("What is the capital of France? I wonder.")
    assert not looks_like_code("Translate this paragraph to French please.")


def test_old_and_new_code_line_shapes_agree():
    # The block-header check replaced the `if .+:$` / `for .+ in .+:$` / `while .+:$` regexes; same answers.
    for text, expected in [
        ("for x in xs:", True), ("  FOR x IN xs:", True), ("for in xs:", False), ("for x in :", False),
        ("for x in xs", False), ("for x in xs: ", False), ("if x:", True), ("if :", False), ("while y:", True),
        ("while :", False), ("format in x:", False),
    ]:
        assert looks_like_code(text) is expected, text


MEGABYTE = 1 << 20


@pytest.mark.parametrize("shape", [
    "for " * (MEGABYTE // 4),  # one huge line: the old `for .+ in .+:$` backtracked over every " in "
    "for a in " * (MEGABYTE // 9),
    "for " + "a in " * (MEGABYTE // 5) + "b",
    "if " + "x" * MEGABYTE,
    "\n" * MEGABYTE + "x",  # `^\s*` at every line start scanned every later newline
    " \n" * (MEGABYTE // 2) + "why",
    "from " + "a" * MEGABYTE,
    "Error" * (MEGABYTE // 5),
    "translate " * (MEGABYTE // 10),
    "write " * (MEGABYTE // 6),
])
def test_routing_is_linear_on_adversarial_megabyte_prompts(shape):
    """Linear, not a fixed time: a megabyte may take at most ~16x as long as a sixteenth of it (the best of three
    each, so a busy machine does not fail a linear router); a quadratic pattern takes ~256x, a backtracking one more."""
    import time

    def best_of_three(request) -> float:
        timings = []
        for _ in range(3):
            started = time.perf_counter()
            choose_specialist(request, ALL)
            timings.append(time.perf_counter() - started)
        return min(timings)

    small = shape[: len(shape) // 16] + shape[-8:]  # the same shape, its ending kept (some shapes end differently)
    for wrap in (lambda text: text, lambda text: [{"role": "user", "content": text}]):
        full, sixteenth = best_of_three(wrap(shape)), best_of_three(wrap(small))
        # 1 ms of slack: a sixteenth can be too quick for the clock to time well.
        assert full < 48 * max(sixteenth, 0.001), f"{full * 1000:.1f} ms vs {sixteenth * 1000:.2f} ms for {shape[:20]!r}"


def test_long_requests_keep_the_ask_at_the_start_and_the_traceback_at_the_end():
    filler = "The weather was nice and I went for a walk.\n" * 20_000
    assert choose_specialist("Please refactor this module.\n" + filler, ALL)[0] == "refactor"
    assert choose_specialist(filler + TRACEBACK, ALL)[0] == "debugger"
