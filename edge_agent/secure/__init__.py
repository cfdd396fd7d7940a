"""The edge's side of secure aggregation: the per-round cryptographic session and the phases over the wire.

``session`` holds one round's keys, shares and mask (no grpc); ``protocol`` runs a session
through a FederationClient's secure RPCs.
"""
