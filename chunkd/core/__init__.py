"""Protocol-neutral use cases (no aiohttp): uploads, finalize, tasks, recovery and sweeping."""
