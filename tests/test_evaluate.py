"""Evaluation metrics that need no model: the answer check reads the answer where the reference template puts it."""

import pytest

from stages.evaluate import answer_correct


@pytest.mark.parametrize(
    "prediction, right",
    [
        ("j appears 1 times", True),  # the template, the answer in place
        ("J  appears 1 TIMES", True),  # spacing and case do not count
        ("1", True),  # the bare answer
        ("j appears 11 times", False),  # a longer number that merely ends like the answer
        ("j appears 2 times", False),
        ("the answer is 1 times", False),  # another prefix: what is left is not the answer
        ("", False),
    ],
)
def test_the_answer_is_read_between_the_references_prefix_and_suffix(prediction, right):
    assert answer_correct(prediction, "j appears 1 times", "1") is right


def test_answers_at_the_end_and_answers_without_spaces():
    assert answer_correct("the max is 88", "the max is 88", "88")
    assert not answer_correct("the max is 87", "the max is 88", "88")
    assert answer_correct("sorted : a e g g h", "sorted : a e g g h", "aeggh")
    assert not answer_correct("sorted : a c e g h", "sorted : a e g g h", "aeggh")
    assert answer_correct("88", "88", "88")  # the reference is the answer itself


def test_a_generation_with_line_breaks_and_pipes_stays_one_table_cell():
    from stages.report import cell

    assert cell("The\nThe | x") == "The<br>The \\| x"
