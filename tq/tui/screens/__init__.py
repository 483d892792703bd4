"""The console's screens: dashboard, tasks, task detail, and the modal dialogs."""
