"""The built-in web chat: a channel like Telegram, served by the bot process."""
