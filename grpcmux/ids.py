"""Client ids: what a valid one looks like, and a random one when none is given."""

MAX_CLIENT_ID_LENGTH = 128


def client_id_problem(client_id):
    """Return why ``client_id`` is not a valid client id, or ``None`` when it is.

    Ids travel as gRPC metadata values, which must be printable ASCII, and in a
    legacy ``<id>\\n`` line and in log lines, so they are 1-128 printable ASCII
    characters without whitespace or ``/``.
    """
    if not isinstance(client_id, str):
        return "a client id must be text"
    if not client_id:
        return "a client id must not be empty"
    if len(client_id) > MAX_CLIENT_ID_LENGTH:
        return f"a client id has at most {MAX_CLIENT_ID_LENGTH} characters, got {len(client_id)}"
    for char in client_id:
        if char.isspace():
            return "a client id must not contain whitespace"
        if char == "/":
            return "a client id must not contain '/'"
        if not "!" <= char <= "~":
            return f"a client id must be printable ASCII, found {char!r}"
    return None


def random_client_id():
    """A two-word pet name such as ``brave-otter``, as the Go original picks."""
    import petname

    return petname.generate(words=2, separator="-")
