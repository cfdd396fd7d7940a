"""The hashed ASTER / FedOCR-Hash recognizer: model, hashing, LMDB data, training and evaluation."""
