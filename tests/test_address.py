"""address.py: paths and ESMTP parameters as RFC 5321 4.1.2 writes them (no network)."""
import pytest

from address import (MAX_DOMAIN, MAX_LOCAL_PART, MAX_PATH, NULL_ADDRESS, AddressError, Address,
                     parse_mailbox, parse_parameters, parse_path, quote_local_part,
                     split_path_and_parameters)


# --- angle brackets ---------------------------------------------------------------------


def test_plain_path():
    path = parse_path("<alice@test.ru>")
    assert path == Address("alice", "test.ru")
    assert path.text == "alice@test.ru"
    assert not path.is_literal


def test_domain_is_lower_cased_local_part_kept():
    path = parse_path("<Alice.Smith@Mail.Example.ORG>")
    assert path.local_part == "Alice.Smith"
    assert path.domain == "mail.example.org"


@pytest.mark.parametrize("text", [
    "alice@test.ru",            # no brackets at all
    "<alice@test.ru",           # no closing bracket
    "alice@test.ru>",           # no opening bracket
    " <alice@test.ru>",         # the caller strips; the parser does not
    "<alice@test.ru> ",
    "(alice@test.ru)",
])
def test_angle_brackets_required(text):
    with pytest.raises(AddressError, match="angle brackets"):
        parse_path(text)


# --- <> ---------------------------------------------------------------------------------


def test_null_path_allowed_as_reverse_path():
    assert parse_path("<>", allow_null=True) == NULL_ADDRESS
    assert NULL_ADDRESS.domain == ""


def test_null_path_refused_as_forward_path():
    with pytest.raises(AddressError):
        parse_path("<>")
    with pytest.raises(AddressError):
        parse_path("<>", allow_bare_postmaster=True)


def test_bare_postmaster_only_where_allowed():
    assert parse_path("<Postmaster>", allow_bare_postmaster=True) == Address("postmaster", "")
    assert parse_path("<POSTMASTER>", allow_bare_postmaster=True) == Address("postmaster", "")
    with pytest.raises(AddressError):
        parse_path("<Postmaster>")
    with pytest.raises(AddressError):
        parse_path("<postmaster>", allow_null=True)
    with pytest.raises(AddressError):           # only postmaster may go without a domain
        parse_path("<alice>", allow_bare_postmaster=True)


# --- quoted local parts -----------------------------------------------------------------


def test_quoted_local_part_with_space():
    path = parse_path('<"john smith"@example.org>')
    assert path.local_part == "john smith"
    assert path.text == '"john smith"@example.org'


def test_quoted_local_part_with_escapes():
    path = parse_path(r'<"a\"b\\c"@example.org>')
    assert path.local_part == 'a"b\\c'
    assert path.text == r'"a\"b\\c"@example.org'


def test_quoted_local_part_with_at_and_gt():
    path = parse_path('<"a@b>c"@example.org>')
    assert path == Address("a@b>c", "example.org")


def test_quoted_dot_string_is_unquoted_in_address():
    path = parse_path('<"alice"@test.ru>')
    assert path.local_part == "alice"
    assert path.text == "alice@test.ru"


def test_empty_quoted_local_part():
    assert parse_path('<""@example.org>') == Address("", "example.org")


@pytest.mark.parametrize("text", [
    '<"unterminated@example.org>',
    '<"a"b@example.org>',                 # text after the closing quote
    '<"a\tb"@example.org>',               # a control character inside quotes
    '<"a"@>',
])
def test_bad_quoted_local_parts(text):
    with pytest.raises(AddressError):
        parse_path(text)


def test_quote_local_part():
    assert quote_local_part("alice.smith") == "alice.smith"
    assert quote_local_part("a b") == '"a b"'
    assert quote_local_part('a"b') == r'"a\"b"'
    assert quote_local_part("a..b") == '"a..b"'


# --- source routes ----------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "<@relay.example:alice@test.ru>",
    "<@one.example,@two.example:alice@test.ru>",
    "<@ONE.example,@two.example:alice@TEST.ru>",
])
def test_source_route_accepted_and_ignored(text):
    assert parse_path(text) == Address("alice", "test.ru")


@pytest.mark.parametrize("text", [
    "<@relay.example alice@test.ru>",       # no colon
    "<@relay.example,two.example:alice@test.ru>",   # a hop without @
    "<@-bad.example:alice@test.ru>",
    "<@:alice@test.ru>",
    "<@relay.example:>",
])
def test_bad_source_routes(text):
    with pytest.raises(AddressError):
        parse_path(text)


# --- address literals -------------------------------------------------------------------


def test_ipv4_literal():
    path = parse_path("<alice@[127.0.0.1]>")
    assert path.domain == "[127.0.0.1]"
    assert path.is_literal
    assert path.text == "alice@[127.0.0.1]"


@pytest.mark.parametrize("text, domain", [
    ("<a@[IPv6:::1]>", "[IPv6:::1]"),
    ("<a@[ipv6:::1]>", "[IPv6:::1]"),
    ("<a@[IPv6:2001:DB8:0:0:0:0:0:1]>", "[IPv6:2001:db8::1]"),
])
def test_ipv6_literal(text, domain):
    path = parse_path(text)
    assert path.domain == domain
    assert path.is_literal


@pytest.mark.parametrize("text", [
    "<a@[127.0.0.1>",
    "<a@[1.2.3]>",
    "<a@[256.1.1.1]>",
    "<a@[]>",
    "<a@[::1]>",                    # IPv6 needs the IPv6: tag
    "<a@[IPv6:1.2.3.4]>",
    "<a@[IPv6:::1%eth0]>",          # no zone id in RFC 5321's IPv6-addr
    "<a@[IPv6:fe80::1%1]>",
    "<a@[tcp:whatever]>",           # the general form is not accepted
    "<a@[127.0.0.1]x>",
])
def test_bad_address_literals(text):
    with pytest.raises(AddressError):
        parse_path(text)


# --- lengths (RFC 5321 4.5.3.1) ---------------------------------------------------------


def test_limits_are_the_rfc_ones():
    assert (MAX_LOCAL_PART, MAX_DOMAIN, MAX_PATH) == (64, 255, 256)


def test_local_part_of_64_octets_is_accepted():
    assert parse_path(f"<{'a' * 64}@test.ru>").local_part == "a" * 64


def test_local_part_of_65_octets_is_refused():
    with pytest.raises(AddressError, match="local part"):
        parse_path(f"<{'a' * 65}@test.ru>")


def _domain_of_length(n):
    """A syntactically valid domain of exactly n octets (labels of at most 63)."""
    full_labels, rest = divmod(n - 1, 63)
    return ("d" * 62 + ".") * full_labels + "e" * (rest + 1)


def test_domain_length_limit():
    exact = _domain_of_length(255)
    assert len(exact) == 255
    assert parse_mailbox(f"a@{exact}").domain == exact
    with pytest.raises(AddressError, match="domain"):
        parse_mailbox(f"a@{exact}x")


def test_path_of_256_octets_is_accepted():
    domain = _domain_of_length(256 - len("<") - 64 - len("@") - len(">"))
    text = f"<{'a' * 64}@{domain}>"
    assert len(text) == 256
    assert parse_path(text).domain == domain


def test_path_of_257_octets_is_refused():
    domain = _domain_of_length(257 - len("<") - 64 - len("@") - len(">"))
    text = f"<{'a' * 64}@{domain}>"
    assert len(text) == 257
    with pytest.raises(AddressError, match="path longer"):
        parse_path(text)


def test_source_route_counts_towards_path_length():
    route = ",".join(f"@r{i}.example" for i in range(30))
    with pytest.raises(AddressError):
        parse_path(f"<{route}:alice@test.ru>")


# --- other bad syntax -------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "<alice>",                      # no domain
    "<alice@>",
    "<@test.ru>",
    "<alice@@test.ru>",
    "<a@b@test.ru>",
    "<.alice@test.ru>",
    "<alice.@test.ru>",
    "<al..ice@test.ru>",
    "<al ice@test.ru>",
    "<al(ice)@test.ru>",
    "<alice@-test.ru>",
    "<alice@test-.ru>",
    "<alice@test..ru>",
    "<alice@.test.ru>",
    "<alice@test.ru.>",
    "<alice@te_st.ru>",
    "<alice@test.ru\x00>",
    "<<alice@test.ru>>",
    "<alice@tést.ru>",
])
def test_bad_syntax(text):
    with pytest.raises(AddressError):
        parse_path(text)


@pytest.mark.parametrize("local_part", ["a+tag", "o'brien", "x/y", "{a}", "a=b", "1-2_3"])
def test_atext_local_parts(local_part):
    assert parse_path(f"<{local_part}@example.org>").local_part == local_part


# --- parameters -------------------------------------------------------------------------


def test_parse_parameters():
    assert parse_parameters("SIZE=1000 BODY=8BITMIME") == {"SIZE": "1000", "BODY": "8BITMIME"}
    assert parse_parameters("") == {}
    assert parse_parameters("   ") == {}


def test_parameter_keywords_are_upper_cased_values_kept():
    assert parse_parameters("size=10 body=8bitmime") == {"SIZE": "10", "BODY": "8bitmime"}


def test_parameter_without_value_maps_to_none():
    assert parse_parameters("SMTPUTF8") == {"SMTPUTF8": None}


@pytest.mark.parametrize("text", [
    "SIZE=",            # = without a value
    "=10",
    "-SIZE=10",         # keyword starts with a letter or digit
    "SI_ZE=10",
    "SIZE=1=2",         # "=" is not esmtp-value
    "SIZE=\x7f",
    "BODY=é",
])
def test_bad_parameters(text):
    with pytest.raises(AddressError):
        parse_parameters(text)


@pytest.mark.parametrize("text, expected", [
    ("<a@b.org>", ("<a@b.org>", "")),
    ("<a@b.org> SIZE=10 BODY=7BIT", ("<a@b.org>", "SIZE=10 BODY=7BIT")),
    ('<"x>y"@b.org> SIZE=10', ('<"x>y"@b.org>', "SIZE=10")),
    (r'<"x\">y"@b.org> SIZE=10', (r'<"x\">y"@b.org>', "SIZE=10")),
    ("<> BODY=8BITMIME", ("<>", "BODY=8BITMIME")),
    ("a@b.org", ("a@b.org", "")),
])
def test_split_path_and_parameters(text, expected):
    assert split_path_and_parameters(text) == expected


def test_a_domain_label_over_63_octets_is_refused():
    parse_path(f"<a@{'b' * 63}.test>")
    with pytest.raises(AddressError):
        parse_path(f"<a@{'b' * 64}.test>")
