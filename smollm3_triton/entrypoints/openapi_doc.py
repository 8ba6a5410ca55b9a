"""placeholder"""


def describe(app) -> None:
    pass
