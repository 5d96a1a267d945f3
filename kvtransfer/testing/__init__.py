"""The transport conformance suite, shipped with the package so it can be run against any
fabric a user has:

    pytest --pyargs kvtransfer.testing --transport tcp
    pytest --pyargs kvtransfer.testing --transport fabric:tcp     # libfabric, tcp;ofi_rxm
    pytest --pyargs kvtransfer.testing --transport fabric:shm     # or fabric:efa on AWS

Every transport must pass the same cases; a case is skipped only for a capability the
transport does not claim (``Endpoint.caps()``), and the skip says which.
"""
