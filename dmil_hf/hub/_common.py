"""What the model card and the push share: the shape of a Hub repo id (`user/name` or `org/name`)."""

import re

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
