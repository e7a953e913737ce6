"""Client id validation and random ids."""

import pytest

from grpcmux.ids import client_id_problem, random_client_id


@pytest.mark.parametrize("good", ["rainbow", "a", "x" * 128, "lab-7.edge_3", "a:b", "~!"])
def test_valid_ids(good):
    assert client_id_problem(good) is None


@pytest.mark.parametrize(
    "bad, why",
    [
        ("", "empty"),
        ("x" * 129, "at most 128"),
        ("two words", "whitespace"),
        ("tab\there", "whitespace"),
        ("a/b", "'/'"),
        ("bell\x07", "printable ASCII"),
        ("nul\x00", "printable ASCII"),
        ("é-ü", "printable ASCII"),
        (b"bytes", "text"),
    ],
)
def test_invalid_ids_say_why(bad, why):
    assert why in client_id_problem(bad)


def test_random_id_is_two_words_and_valid():
    client_id = random_client_id()
    assert len(client_id.split("-")) == 2
    assert client_id_problem(client_id) is None
