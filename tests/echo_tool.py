"""A stand-in tool task for the sampler tests."""


class EchoTool:
    """A call ends with ``>`` and returns ``(n)``, n = its length; an answer ends at a newline."""

    name, has_tools, call_end, stop, alphabet = "echo", True, ">", "\n", "<>()0123456789"

    def tool_result(self, text):
        return f"({len(text)})" if text.endswith(">") else None

    def finished(self, text):
        return text.endswith("\n")
