"""vLLM integration: ``KVTransferConnector``, a vLLM v1 KV connector backed by kvtransfer.

Load it in vLLM with::

    --kv-transfer-config '{"kv_connector": "KVTransferConnector",
                           "kv_connector_module_path": "kvtransfer.integrations.vllm",
                           "kv_role": "kv_producer", "kv_connector_extra_config": {"mode": "pull"}}'

``KVTransferConnector`` imports vLLM (``pip install kvtransfer[vllm]``) when first accessed;
importing this package, or ``kvtransfer`` alone, never does (vLLM's API-server process imports
the module too, so that stays cheap).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .connector import KVTransferConnector

__all__ = ["KVTransferConnector"]


def __getattr__(name: str) -> Any:
    if name == "KVTransferConnector":
        from .connector import KVTransferConnector

        return KVTransferConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
