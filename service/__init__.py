"""Starting and stopping ``tritonserver`` on ``model_repository/``: settings, logging, health."""
