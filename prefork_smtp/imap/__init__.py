"""IMAP4rev1 building blocks (SPEC §9), all sans-IO: bytes and values in, events and bytes out.

    parser    CommandParser: client octets -> Command / SendContinuation / ParseError / Line
    grammar   one complete command -> tag, name and arguments; the command table
    commands  the arguments of each command (Fetch, Store, the Search* tree, ...)
    message   Message: MIME structure, ENVELOPE, BODY/BODYSTRUCTURE, BODY[section] of stored
              octets; MailItem (what SEARCH and FETCH need of one message)
    search    search(program, items): RFC 3501 §6.4.4 evaluation
    fetch     fetch_response(seq, attributes, item): one `* n FETCH (...)` line
    response  every protocol text, status lines, string/literal encoding, capabilities
    addresses RFC 5322 address lists for ENVELOPE

Dependencies point one way: parser -> grammar -> commands, response; message ->
addresses; fetch -> commands, message, response; search -> commands, message, response.
None of them touches a socket, a file, a clock or a logger; the IMAP state machine and
session are built on top.
"""
