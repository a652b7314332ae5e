"""The emails the page tests draft, review and correct: (sender, subject, body, reviewer's reply)."""

EMAILS = [
    (
        "Dana Whitfield <dana@example.com>",
        "[NW-48213] Brake squeal after service",
        "Hi,\n\nI picked up my bike on Saturday after the spring service and the front brake squeals on "
        "every stop. Can I bring it back in this week?\n\nThanks,\nDana",
        "Hello Dana,\n\nsorry to hear about the brake. Please bring the bike back any day this week and "
        "we will look at it.\n\nRegards,\nNorthwind Cycles",
    ),
    (
        "Omar Haddad <omar@example.net>",
        "Order 5521: wrong tyre size",
        "Hello, the tyres in order 5521 are 700x25 but I ordered 700x28. How do I swap them?\n\nOmar",
        "Hi Omar,\n\nthank you for your message. You can return the tyres and we will send the right size.\n\n"
        "Regards,\nNorthwind Cycles",
    ),
    (
        "Lena Fischer <lena.fischer@example.org>",
        "Kids' bike fitting on Saturday?",
        "Do you do fittings for kids' bikes on Saturdays? My daughter is 7.\n\nLena",
        "Hello Lena,\n\nyes, we fit kids' bikes on Saturdays from 9 to 1. No booking is needed.\n\n"
        "Regards,\nNorthwind Cycles",
    ),
]
