"""What both sides need to speak the FedOCR wire: stubs, encoding, chunking, TLS and PKI."""
