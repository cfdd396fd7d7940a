"""The paper's experiments in miniature: Table 1, Table 2 and Fig. 3 with this project's own services."""
