"""kolm_infer: serve verified ``.kolm`` artifacts; every prediction gets a signed receipt.

Example (a running ledger at 127.0.0.1:7070, keys from ``kolm keys init keys``)::

    import asyncio
    from pathlib import Path
    from kolm_infer import start
    from kolm_ledger.keys import PrivateKey, TrustRoot

    async def main():
        srv = await start("127.0.0.1:7070", TrustRoot.load("keys/trust.json"),
                          PrivateKey.load("keys/infer.key"), artifacts=[Path("router.kolm")])
        ...
        await srv.stop()

    asyncio.run(main())

Names load lazily, so ``import kolm_infer`` pulls in neither torch nor gRPC stubs.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Engine",
    "InferenceServer",
    "LoadedArtifact",
    "Prediction",
    "ReceiptWriter",
    "Spool",
    "sign_prediction",
    "start",
]

_WHERE = {
    "Engine": "engine",
    "InferenceServer": "service",
    "LoadedArtifact": "engine",
    "Prediction": "engine",
    "ReceiptWriter": "receipts",
    "Spool": "receipts",
    "sign_prediction": "receipts",
    "start": "service",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
