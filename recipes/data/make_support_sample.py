"""Builds support-train.jsonl and support-dev.jsonl: an original sample of merchant / customer-service consultations.

Written for hmcl (not taken from any data set). Each intent has hand-written customer
questions and hand-written answers; intents are grouped in families. For a question:
  pos  = an answer of its own intent,
  weak = answers of sibling intents in the same family (related, but not the answer),
  neg  = answers from other families (two of them lexically close: same product words).
The last question of each intent (both variants) is held out as support-dev.jsonl, so the
dev split asks questions phrased unlike any training question.
Run:  python recipes/data/make_support_sample.py   (deterministic; rewrites support-*.jsonl)
"""

import json
import random
from pathlib import Path

ITEMS = ["my order", "the jacket I bought", "my package", "the headphones", "order #48213",
         "the coffee machine", "my last purchase", "the running shoes"]

# family -> intent -> (questions, answers); "{item}" is filled from ITEMS
FAMILIES = {
    "refunds": {
        "refund_time": (
            ["How long does a refund take to reach my card?", "When will I get my money back for {item}?",
             "It's been a week since you approved my refund, where is it?", "How many days until the refund shows on my bank statement?",
             "Refund approved but no money yet, how long should I wait?", "When is the refund for {item} credited?"],
            ["Once a refund is approved it is sent the same day; banks usually show it on your statement within 5 to 10 business days.",
             "Approved refunds leave our side within 24 hours. Depending on your card issuer it takes 5-10 business days to appear."]),
        "refund_request": (
            ["How do I ask for a refund for {item}?", "I want my money back, what do I do?",
             "Where can I request a refund?", "Can I get a refund if I changed my mind about {item}?",
             "What's the process to get refunded?", "Is there a form to apply for a refund?"],
            ["Go to Orders, choose the item and press 'Request refund'. Tell us the reason and we reply within two business days.",
             "Refunds are requested from your order page within 30 days of delivery: select the item, pick a reason and submit."]),
        "refund_method": (
            ["Will the refund go back to my credit card or store credit?", "Can I get the refund for {item} as store credit instead?",
             "I paid with a gift card, how am I refunded?", "Do you refund to the original payment method?",
             "Can the refund be sent to a different card?", "My old card expired, where does my refund go?"],
            ["Refunds go back to the original payment method. Gift-card payments are refunded as a new gift card, and you may choose store credit instead.",
             "We always refund to the card or wallet you paid with; if that card is closed, your bank forwards the money to your new account."]),
    },
    "shipping": {
        "shipping_time": (
            ["How long does delivery take?", "When will {item} arrive?", "How many days is standard shipping?",
             "If I order today when do I get it?", "What are your delivery times?", "Is express delivery faster than 2 days?"],
            ["Standard delivery takes 3 to 5 business days; express arrives in 1 to 2 business days if you order before 2 pm.",
             "Orders ship within 24 hours. Standard shipping then takes 3-5 working days and express 1-2."]),
        "shipping_cost": (
            ["How much is shipping?", "Do you offer free delivery?", "Why was I charged for shipping on {item}?",
             "What's the minimum order for free shipping?", "How much does express delivery cost?", "Is shipping free for members?"],
            ["Shipping is free on orders over $50; below that standard delivery costs $4.99 and express $12.99.",
             "Standard delivery is $4.99, free above $50 or for members; express delivery is $12.99 on any order."]),
        "international_shipping": (
            ["Do you ship to Canada?", "Can I order from outside the country?", "Do you deliver {item} internationally?",
             "Which countries do you ship to?", "Will I pay customs duties on an international order?", "How long does shipping to Europe take?"],
            ["We ship to 40 countries including Canada, the UK and the EU. International delivery takes 7-14 days and duties are paid on arrival.",
             "International orders are welcome; the checkout shows whether we deliver to your country. Import duties and taxes are charged by your customs office."]),
        "track_order": (
            ["Where is {item}?", "How can I track my package?", "The tracking number doesn't work, what now?",
             "Can I see where my delivery is?", "My order says shipped, how do I follow it?", "Where do I find my tracking link?"],
            ["Your tracking link is in the shipping confirmation email and on the order page; it becomes active a few hours after dispatch.",
             "Open Orders and press 'Track package' to see the carrier's live status. New tracking numbers can take up to 24 hours to update."]),
    },
    "orders": {
        "cancel_order": (
            ["How do I cancel {item}?", "I ordered by mistake, can I cancel?", "Is it too late to cancel my order?",
             "Cancel my order please", "Can I cancel after it has shipped?", "Where is the cancel button for an order?"],
            ["You can cancel from the order page until the order is packed, usually within one hour. After shipping, return it instead.",
             "Orders can be cancelled for free before they are dispatched: open the order and press 'Cancel'. Shipped orders must be returned."]),
        "change_address": (
            ["Can I change the delivery address for {item}?", "I entered the wrong address, help!",
             "How do I update the shipping address on an order?", "I moved, can you send my order somewhere else?",
             "Can the courier deliver to my office instead?", "Is it possible to edit the address after paying?"],
            ["The address can be edited on the order page until the parcel is handed to the carrier; after that, ask the carrier to redirect it.",
             "Before dispatch you can change the address yourself under Orders > Edit address. Once shipped, use the carrier's redirect option."]),
        "modify_order": (
            ["Can I add another item to {item}?", "I want to change the color of what I ordered",
             "Can I change the quantity on my order?", "How do I swap a product in an order I already placed?",
             "Can two orders be combined into one shipment?", "I forgot something, can I add it to my order?"],
            ["Placed orders can't be edited, but you can cancel within an hour and order again with the changes.",
             "We can't add or swap items on a paid order; cancel it before it is packed and place a new one."]),
    },
    "returns": {
        "exchange_size": (
            ["The shoes are too small, can I exchange them for a bigger size?", "How do I swap {item} for another size?",
             "Can I exchange a shirt for a different size?", "Is a size exchange free?",
             "The jacket doesn't fit, can I get a medium instead?", "Do you do exchanges or only refunds?"],
            ["Size exchanges are free within 30 days: start a return, choose 'Exchange' and pick the new size; we ship it as soon as we scan your parcel.",
             "Choose 'Exchange for another size' in your order; the new size is reserved for you and shipped free when the return is on its way."]),
        "return_label": (
            ["How do I get a return label?", "Do I have to pay for the return shipping of {item}?",
             "Where do I print my return label?", "I don't have a printer, how can I send a return?",
             "Which carrier do I use for returns?", "Can I drop off a return at a post office?"],
            ["Start the return on your order page to get a free prepaid label; no printer? choose the QR code and show it at any drop-off point.",
             "Return labels are free and emailed to you when you start a return. You can print it or use a QR code at the post office."]),
        "damaged_item": (
            ["{item} arrived broken", "The item I received is damaged, what do I do?", "My package was crushed and the product is scratched",
             "I got a defective product", "The box arrived open and something is missing", "What if the product doesn't work out of the box?"],
            ["Sorry about that! Send us a photo from the order page within 14 days and we send a replacement or a full refund, no return needed.",
             "For damaged or defective items, report it with a photo under Orders > Report a problem; we replace it free of charge."]),
    },
    "payments": {
        "payment_methods": (
            ["What payment methods do you accept?", "Can I pay with PayPal?", "Do you take Apple Pay for {item}?",
             "Can I pay cash on delivery?", "Which credit cards can I use?", "Can I pay by bank transfer?"],
            ["We accept Visa, Mastercard, American Express, PayPal, Apple Pay and Google Pay. Cash on delivery is not available.",
             "At checkout you can pay by card, PayPal, Apple Pay or Google Pay; bank transfer is available for business accounts."]),
        "payment_failed": (
            ["My payment keeps getting declined", "Why did my card payment fail?", "I was charged but the order for {item} failed",
             "Checkout says payment error, what should I do?", "The payment page won't load", "My card was declined but I have money"],
            ["A declined payment usually comes from the bank's security check: confirm the purchase in your bank app or try another card. Failed orders are never charged; a pending hold disappears within 3 days.",
             "If checkout shows a payment error, check the card details and 3-D Secure confirmation. Any amount held for a failed order is released automatically."]),
        "installments": (
            ["Can I pay in installments?", "Do you offer buy now pay later?", "Can I split the payment for {item}?",
             "Is there financing for expensive items?", "Can I pay monthly?", "Do you have Klarna or Afterpay?"],
            ["Yes: orders over $100 can be paid in 3 or 4 interest-free installments with Klarna, chosen at checkout.",
             "Buy now, pay later is available through Klarna for orders above $100: four equal payments, no interest."]),
    },
    "account": {
        "reset_password": (
            ["I forgot my password", "How do I reset my password?", "I can't log in to my account",
             "The password reset email never arrived", "How do I change my password?", "My account is locked after too many attempts"],
            ["Press 'Forgot password' on the sign-in page and follow the link we email you; check spam if it doesn't arrive within 5 minutes.",
             "Reset your password from the login page with 'Forgot password'. Locked accounts unlock automatically after 30 minutes."]),
        "delete_account": (
            ["How do I delete my account?", "Please remove all my personal data", "Can I close my account?",
             "I want to unsubscribe and delete my profile", "How do I request my data be erased?", "What happens to my orders if I delete my account?"],
            ["You can delete your account under Settings > Privacy > Delete account; your data is erased within 30 days, except invoices we must keep by law.",
             "Account deletion is in Settings > Privacy. Open orders must be completed first; personal data is removed within 30 days."]),
        "update_email": (
            ["How do I change my email address?", "Can I update the email on my account?", "I no longer use my old email, how do I switch it?",
             "Where do I edit my contact details?", "How can I change my phone number on my profile?", "My email has a typo, can I fix it?"],
            ["Change your email or phone number under Settings > Profile; we send a code to the new address to confirm it.",
             "Contact details are edited in Settings > Profile. The new email becomes active after you confirm it with the code we send."]),
    },
    "promotions": {
        "coupon_not_working": (
            ["My coupon code doesn't work", "Why is my discount code invalid?", "The promo code isn't applying to {item}",
             "Can I use two coupons on one order?", "The voucher says expired but I just got it", "How do I enter a discount code?"],
            ["Enter the code in the 'Promo code' box at checkout. Codes are case-sensitive, one per order, and some exclude sale items.",
             "Discount codes apply only to eligible items and can't be combined. Check the expiry date and type the code exactly as sent."]),
        "loyalty_points": (
            ["How do loyalty points work?", "How many points do I get for {item}?", "How can I use my reward points?",
             "Do my points expire?", "Where can I see my points balance?", "Can I pay with points?"],
            ["You earn 1 point per dollar spent; 100 points give $5 off at checkout. Points expire 12 months after your last purchase.",
             "Your points balance is under Account > Rewards. Redeem them at checkout in steps of 100 points ($5)."]),
        "price_adjustment": (
            ["The price dropped after I bought {item}, can I get the difference?", "Do you price match?",
             "It went on sale the day after I ordered", "Can I get a price adjustment?", "Another shop sells it cheaper, will you match?",
             "Is there a refund of the difference if the price goes down?"],
            ["If our price drops within 14 days of your purchase, ask for a price adjustment from the order page and we refund the difference.",
             "We refund price drops on our own site within 14 days. We don't match other retailers' prices."]),
    },
    "seller": {
        "open_store": (
            ["How do I become a seller on your marketplace?", "I want to open a shop on your platform", "What do I need to register as a merchant?",
             "Can individuals sell on the marketplace or only companies?", "How long does seller verification take?", "How do I set up my seller account?"],
            ["Register at the Seller Center with your business ID, bank account and a photo ID; verification takes 2-3 business days.",
             "Individuals and companies can sell. Create a Seller Center account, upload your ID and bank details, and we verify you within 3 days."]),
        "commission_fees": (
            ["What commission do you take from sellers?", "How much are the marketplace fees?", "Is there a monthly fee to sell?",
             "What percentage do you charge per sale?", "Are there listing fees for merchants?", "How are seller fees calculated?"],
            ["Sellers pay a 10% commission on each sale (8% in electronics) and no listing fee; the Pro plan costs $39 per month.",
             "There is no fee to list products. We keep a commission of 8-12% per sale depending on the category."]),
        "payout_schedule": (
            ["When do sellers get paid?", "How often are payouts sent to my bank?", "My payout hasn't arrived, why?",
             "How long after a sale do I receive the money?", "Can I get paid daily as a merchant?", "Where can I see my settlement report?"],
            ["Payouts are sent every Monday for orders delivered more than 7 days earlier; the settlement report is in Seller Center > Finance.",
             "We settle weekly: delivered orders older than 7 days are paid to your bank every Monday. Missing payouts are usually an unverified bank account."]),
        "list_product": (
            ["How do I list a new product?", "Can I upload my catalogue in bulk?", "Why was my product listing rejected?",
             "What image size do product photos need?", "How do I add variants like size and color to a listing?", "How long until my listing is live?"],
            ["Add products in Seller Center > Catalogue one by one or by CSV upload. Photos need a white background and at least 1000 px; listings go live after a short review.",
             "Use bulk CSV upload for large catalogues and add variants in the listing editor. Rejections list the reason, usually images or a missing category."]),
        "ad_campaign": (
            ["How do I advertise my products?", "How do sponsored listings work for sellers?", "What does it cost to promote my shop?",
             "Can I set a daily budget for ads?", "How do I see the results of my ad campaign?", "Is there a minimum spend for sponsored products?"],
            ["Create a sponsored-products campaign in Seller Center > Ads: set a daily budget (from $5) and pay per click. Reports show clicks, sales and ROAS.",
             "Promoted listings are pay-per-click with a daily budget you choose, minimum $5 a day; performance is reported in the Ads dashboard."]),
    },
    "products": {
        "restock": (
            ["When will this be back in stock?", "{item} is sold out, will you restock it?", "Can I get notified when it's available again?",
             "Do you restock sold-out sizes?", "Can I pre-order an out-of-stock item?", "Why is it out of stock everywhere?"],
            ["Press 'Notify me' on the product page and we email you as soon as it's back; most items are restocked within 2-4 weeks.",
             "Sold-out items usually return within a month. Use 'Notify me' to get an email the moment your size is in stock."]),
        "warranty": (
            ["Does {item} have a warranty?", "How long is the warranty on electronics?", "My device stopped working after 6 months",
             "How do I make a warranty claim?", "Is the warranty international?", "Can I buy an extended warranty?"],
            ["All products carry a 2-year warranty. Start a claim under Orders > Report a problem with the serial number; we repair or replace it.",
             "Electronics have a 2-year manufacturer warranty, extendable to 4 years at checkout. Claims are made from your order page."]),
        "size_guide": (
            ["How do I know what size to order?", "Do your clothes run small?", "Where is the size chart for {item}?",
             "I'm between two sizes, which should I pick?", "Are the shoe sizes EU or US?", "How do I measure myself for a jacket?"],
            ["Each product page has a 'Size guide' with measurements in cm and inches; if you're between sizes, pick the larger one.",
             "Our sizes are true to fit. Shoe pages show EU, UK and US sizes, and the size guide explains how to measure chest and waist."]),
    },
    "stores": {
        "store_hours": (
            ["What time does the store open?", "Are you open on Sundays?", "What are your opening hours on holidays?",
             "When does the downtown shop close?", "Is customer service open at night?", "What are the hours of your phone support?"],
            ["Our stores are open Monday-Saturday 9am-8pm and Sunday 11am-5pm; phone support runs every day from 8am to 10pm.",
             "Opening hours are on each store's page: most open 9 to 8 on weekdays and 11 to 5 on Sundays. Holiday hours are posted a week ahead."]),
        "pickup_in_store": (
            ["Can I pick up {item} in store?", "Do you offer click and collect?", "How long do you hold an order for pickup?",
             "Who can collect my order for me?", "Is in-store pickup free?", "When is my pickup order ready?"],
            ["Choose 'Pick up in store' at checkout; it's free, ready in about 2 hours and held for 7 days. Bring the pickup code and an ID.",
             "Click and collect is free: we email you when the order is ready, usually the same day. Someone else can collect it with your code."]),
    },
}
PREFIXES = ["", "", "", "Hi, ", "Hello! ", "Quick question: ", "Hey there, "]
SUFFIXES = [" Thanks!", " Thank you.", " Please help.", " Thanks in advance."]
DEV_QUESTION = 5  # the last question of every intent is held out for the dev split


def main() -> None:
    rng = random.Random(20251123)
    answers = {(f, i): a for f, intents in FAMILIES.items() for i, (_, a) in intents.items()}
    rows = {"train": [], "dev": []}
    for family, intents in FAMILIES.items():
        for intent, (questions, own) in intents.items():
            siblings = [a for (f, i), ans in answers.items() if f == family and i != intent for a in ans]
            others = [a for (f, _), ans in answers.items() if f != family for a in ans]
            for qi, template in enumerate(questions):
                for variant in range(2):
                    item = ITEMS[(qi * 3 + variant * 5 + len(intent)) % len(ITEMS)]
                    q = rng.choice(PREFIXES) + template.replace("{item}", item)
                    if variant and "{item}" not in template:
                        q += rng.choice(SUFFIXES)
                    split = "dev" if qi == DEV_QUESTION else "train"
                    rows[split].append({"query": q, "pos": [own[(qi + variant) % 2]], "weak": rng.sample(siblings, 2),
                                 "neg": rng.sample(others, 3)})
    for split, part in rows.items():
        rng.shuffle(part)
        out = Path(__file__).with_name(f"support-{split}.jsonl")
        out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
        print(f"wrote {len(part)} examples to {out}")


if __name__ == "__main__":
    main()
