import pytest

from pipelines.stages.url_policy import UrlPolicy


def _fixed(addresses: dict[str, list[str]]):
    return lambda host: addresses[host]


@pytest.mark.parametrize(
    "url, reason, detail",
    [
        ("file:///etc/passwd", "url_policy", "scheme 'file'"),
        ("ftp://example.org/a.jpg", "url_policy", "scheme 'ftp'"),
        ("http://127.0.0.1:8000/a.jpg", "url_policy", "non-public address 127.0.0.1"),
        ("http://169.254.169.254/latest/meta-data", "url_policy", "non-public address 169.254.169.254"),
        ("http://10.1.2.3/a.jpg", "url_policy", "non-public address 10.1.2.3"),
        ("http://192.168.0.7/a.jpg", "url_policy", "non-public address"),
        ("http://[::1]/a.jpg", "url_policy", "non-public address ::1"),
        ("http://[fe80::1]/a.jpg", "url_policy", "non-public address"),
        ("http://0.0.0.0/a.jpg", "url_policy", "non-public address"),
        ("http:///a.jpg", "invalid_url", "no host"),
        ("http://[::1/a.jpg", "invalid_url", "malformed URL"),
        ("http://user:hunter2@93.184.215.14/a.jpg", "invalid_url", "carries credentials"),
        ("http://93.184.215.14:99999/a.jpg", "invalid_url", "Port out of range"),
        ("http://93.184.215.14:0/a.jpg", "invalid_url", "port 0"),
        ("http://93.184.215.14/a cat.jpg", "invalid_url", "a space or a control character"),
        ("http://93.184.215.14/a\x00.jpg", "invalid_url", "a space or a control character"),
    ],
)
def test_refuses_unfetchable_non_http_and_internal_targets_with_their_reason(
    url: str, reason: str, detail: str
) -> None:
    refusal = UrlPolicy().check(url)
    assert refusal.reason == reason and detail in refusal.detail
    assert "hunter2" not in refusal.detail


def test_host_names_are_judged_by_what_they_resolve_to() -> None:
    policy = UrlPolicy(resolver=_fixed({"images.example": ["93.184.215.14"], "sneaky.example": ["10.0.0.5"]}))
    assert policy.check("https://images.example/cat.jpg") is None
    assert "10.0.0.5" in policy.check("https://sneaky.example/cat.jpg").detail


def test_one_private_address_among_public_ones_is_enough_to_refuse() -> None:
    policy = UrlPolicy(resolver=_fixed({"mixed.example": ["93.184.215.14", "192.168.1.1"]}))
    assert "192.168.1.1" in policy.check("http://mixed.example/a.png").detail


def test_unresolvable_host_is_refused_with_reason() -> None:
    def fail(host: str) -> list[str]:
        raise OSError("Name or service not known")

    assert UrlPolicy(resolver=fail).check("http://nowhere.invalid/a.jpg") == (
        "dns_error",
        "host 'nowhere.invalid' does not resolve (Name or service not known)",
    )


def test_allowed_networks_let_exactly_those_addresses_through() -> None:
    policy = UrlPolicy(allowed_networks=("127.0.0.1/32",))
    assert policy.check("http://127.0.0.1:9/a.jpg") is None
    assert policy.check("http://127.0.0.2:9/a.jpg") is not None
    assert policy.check("http://169.254.169.254/") is not None


def test_bad_allowed_network_fails_fast() -> None:
    with pytest.raises(ValueError, match="not a CIDR"):
        UrlPolicy(allowed_networks=("localhost",))


def test_check_many_resolves_each_host_once_and_agrees_with_check() -> None:
    dns = {"images.example": ["93.184.215.14"], "sneaky.example": ["10.0.0.5"]}
    lookups = []

    def resolve(host: str) -> list[str]:
        lookups.append(host)
        if host not in dns:
            raise OSError("Name or service not known")
        return dns[host]

    urls = [
        *(f"https://images.example/{i}.jpg" for i in range(5)),
        "https://sneaky.example/a.jpg",
        "http://nowhere.invalid/a.jpg",
        "ftp://images.example/a.jpg",
        "http:///a.jpg",
        "http://[::1/a.jpg",
    ]
    verdicts = UrlPolicy(resolver=resolve).check_many(urls)
    assert sorted(lookups) == ["images.example", "nowhere.invalid", "sneaky.example"]
    assert verdicts == [UrlPolicy(resolver=resolve).check(url) for url in urls]
    assert verdicts[:5] == [None] * 5 and all(verdicts[5:])
