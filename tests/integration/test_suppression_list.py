"""The suppression list in a real LMDB spool: per tenant and operator-wide entries, the
kinds of mail they block, expiry, removal, and listing across pages."""

from __future__ import annotations

import pytest

from relay.spool import Spool
from relay.spool.suppression import Suppression, SuppressionList


@pytest.fixture
def supp(tmp_path):
    spool = Spool(tmp_path / "spool", 1 << 30)
    yield SuppressionList(spool)
    spool.close()


def test_tenant_and_operator_wide_entries_and_what_they_block(supp: SuppressionList) -> None:
    supp.add([
        Suppression(address="All@Dest.test", source="manual"),
        Suppression(address="camp@dest.test", tenant="acme", source="unsubscribe",
                    transactional=False),
        Suppression(address="old@dest.test", tenant="acme", expires=100.0),
    ])
    addrs = ["all@dest.test", "camp@dest.test", "old@dest.test", "free@dest.test"]
    assert set(supp.blocking("acme", addrs, now=50.0)) == {
        "all@dest.test", "camp@dest.test", "old@dest.test"}
    assert set(supp.blocking("acme", addrs, now=200.0)) == {"all@dest.test", "camp@dest.test"}
    assert set(supp.blocking("acme", addrs, transactional=True, now=200.0)) == {"all@dest.test"}
    assert set(supp.blocking("other", addrs, now=50.0)) == {"all@dest.test"}
    assert set(supp.blocking(None, addrs, now=50.0)) == {"all@dest.test"}
    assert supp.remove("acme", "CAMP@dest.test") is True
    assert supp.remove("acme", "camp@dest.test") is False
    assert "camp@dest.test" not in supp.blocking("acme", addrs)


def test_listing_pages_through_a_long_list(supp: SuppressionList) -> None:
    supp.add(Suppression(address=f"u{i:05d}@dest.test", tenant="acme") for i in range(2500))
    supp.add([Suppression(address="x@dest.test", tenant="zeta")])
    listed = [e.address for e in supp.entries("acme")]
    assert listed == [f"u{i:05d}@dest.test" for i in range(2500)]
    assert len(list(supp.entries())) == 2501
    assert [e.address for e in supp.entries("zeta")] == ["x@dest.test"]
    assert list(supp.entries("nobody")) == []
