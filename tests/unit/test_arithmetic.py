"""The arithmetic task: deterministic sampling, correct answers, robust answer extraction."""

import pytest

from troupe.actors.tasks.arithmetic import ArithmeticTask, extract_answer, has_answer_line


def test_sampling_is_deterministic_per_iteration_and_answers_are_right():
    task = ArithmeticTask(1, 9, "+-*", seed=3)
    a, b = task.sample(20, iteration=2), task.sample(20, iteration=2)
    assert a == b
    assert a != task.sample(20, iteration=3)
    for p in a:
        nums = [int(w) for w in p.question.replace(".", " ").replace("?", " ").split() if w.isdigit()]
        x, y = nums[0], nums[1]
        assert p.answer == {"+": x + y, "-": x - y, "*": x * y}[p.operation]
        assert p.answer >= 0


def test_extract_prefers_the_answer_line():
    assert extract_answer("3 + 4 = 7. Answer: 7") == 7
    assert extract_answer("Answer: 12\nwait, 2 + 3 = 5") == 12
    assert extract_answer("so 1,200 apples") == 1200
    assert extract_answer("no digits here") is None
    assert has_answer_line("answer = 5") and not has_answer_line("the result is 5")


def test_bad_task_settings_name_the_key():
    with pytest.raises(ValueError, match="operations"):
        ArithmeticTask(operations="/")
    with pytest.raises(ValueError, match="min_operand"):
        ArithmeticTask(min_operand=5, max_operand=2)
