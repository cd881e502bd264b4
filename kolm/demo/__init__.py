"""``kolm demo``: the whole story end to end (:mod:`kolm.demo.full`) and its trust-core
part (:mod:`kolm.demo.trust_core`)."""

__all__: list[str] = []
