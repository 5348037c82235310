"""The SMTP protocol side: sans-IO engine and session, replies, Received, content scan, asyncio shell."""
